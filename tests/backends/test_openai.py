"""OpenAI-compatible servers as deployments, against llama-cpp-python's real server on the loopback
(and, for the faults a network brings, a proxy in front of it): the server's sampling defaults
never apply, every failure is one message, and nothing received is lost."""

import http.client
import json
import socket
from urllib.parse import urlsplit

import pytest
from loopback import SERVED_NAME, free_port, llama_server

from quada.backends import LLAMACPP, OPENAI, OPENAI_CHAT
from quada.errors import QuadaError
from quada.options import VetConfig
from quada.store import Generation, Store
from quada.vet import vet


def config(model_dir, run_inputs, run, *deployments, **options) -> VetConfig:
    settings = dict(model=str(model_dir), benchmark=str(run_inputs["harmful"]), benign=str(run_inputs["benign"]),
                    limit=None, benign_limit=None, judges=("keyword",), calibrate=False, corpus=str(run_inputs["corpus"]),
                    ppl_windows=1, max_new_tokens=10, run_dir=run, deployment=deployments, retries=2)
    return VetConfig(**{**settings, **options})


def responses(run, condition_prefix: str) -> dict[str, str]:
    """The stored responses of the condition whose name starts with ``condition_prefix``, by prompt id."""
    with Store(run / "results.sqlite") as store:
        return {g.key.prompt_id: g.response for g in store.rows(Generation) if g.key.approx.startswith(condition_prefix)}


def served(url: str) -> str:
    return f"{OPENAI}:{url}@{SERVED_NAME}"


def test_a_server_answers_as_llama_cpp_in_process_does(model_dir, run_inputs, tiny_gguf, server_url, tmp_path):
    """The same GGUF served and run in process gives the same responses: temperature 0 and every
    penalty are sent, so the server's defaults (repeat penalty 1.1) never apply. The server drops
    bytes that are no whole UTF-8 character, where quada's decoder writes U+FFFD."""
    run = tmp_path / "run"
    result = vet(config(model_dir, run_inputs, run, f"{LLAMACPP}:{tiny_gguf}", served(server_url)), progress=False)
    in_process, server = responses(run, LLAMACPP), responses(run, OPENAI)
    assert len(server) == len(run_inputs["harmful_prompts"]) + len(run_inputs["benign_prompts"])
    assert {k: v.replace("\ufffd", "") for k, v in in_process.items()} == server
    assert [c.approx.split(":")[0] for c in result.conditions] == ["none", LLAMACPP, OPENAI]
    saved = json.loads((run / "results.json").read_text())
    assert saved["deployments"][served(server_url)]["deterministic"]
    assert saved["deployments"][served(server_url)]["perplexity"] is None  # not measurable through the API
    # What the server would have answered with its own defaults (repeat penalty 1.1) differs.
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 30}
    greedy = _post(server_url, "/completions", {**body, "temperature": 0, "repeat_penalty": 1.0})
    defaults = _post(server_url, "/completions", {**body, "temperature": 0})
    assert greedy["choices"][0]["text"] != defaults["choices"][0]["text"]


def _post(url: str, path: str, body: dict) -> dict:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", parts.path + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return json.loads(connection.getresponse().read())


def test_a_name_the_server_does_not_serve_is_refused_before_any_model_work(model_dir, run_inputs, server_url, tmp_path):
    # llama-cpp-python's server would answer any name with its own model.
    with pytest.raises(QuadaError, match="does not serve a model named 'qwen' .*'tiny'"):
        vet(config(model_dir, run_inputs, tmp_path / "run", f"{OPENAI}:{server_url}@qwen"), progress=False)
    assert not (tmp_path / "run").exists()


def test_an_unreachable_server_fails_at_once(model_dir, run_inputs, tmp_path, allow):
    port = free_port()  # nothing listens on it
    allow(port)
    with pytest.raises(QuadaError, match=f"cannot reach an OpenAI-compatible server at http://127.0.0.1:{port}/v1"):
        vet(config(model_dir, run_inputs, tmp_path / "run", f"{OPENAI}:http://127.0.0.1:{port}/v1@m"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_server_that_accepts_but_never_answers_fails_after_the_connect_timeout(model_dir, run_inputs, tmp_path, allow):
    with socket.socket() as silent:  # listens (the kernel accepts connections) but never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        allow(port)
        with pytest.raises(QuadaError, match=r"cannot reach .*\(no answer within 5 s\)"):
            vet(config(model_dir, run_inputs, tmp_path / "run", f"{OPENAI}:http://127.0.0.1:{port}/v1@m"), progress=False)
    assert not (tmp_path / "run").exists()


def test_429_5xx_dropped_and_cut_off_answers_are_retried_to_the_same_rows(model_dir, run_inputs, server_url, proxy, tmp_path):
    direct = tmp_path / "direct"
    vet(config(model_dir, run_inputs, direct, served(server_url)), progress=False)
    proxy.faults = [429, None, 503, "cut", None, "drop", 500]
    through = tmp_path / "through"
    vet(config(model_dir, run_inputs, through, served(proxy.url)), progress=False)
    assert responses(through, OPENAI) == responses(direct, OPENAI)
    assert not proxy.faults


def test_a_server_that_stops_answering_loses_nothing_and_the_run_resumes(model_dir, run_inputs, server_url, proxy, tmp_path):
    direct = tmp_path / "direct"
    vet(config(model_dir, run_inputs, direct, served(server_url)), progress=False)
    proxy.faults = [None, None, None, "down"]
    run = tmp_path / "run"
    with pytest.raises(QuadaError, match="stopped answering .* after 3 attempts .* continues where it stopped"):
        vet(config(model_dir, run_inputs, run, served(proxy.url)), progress=False)
    assert len(responses(run, OPENAI)) == 3  # every response received is stored
    assert len(responses(run, "none")) == 6  # and so is the reference
    proxy.down = False
    passed = proxy.passed
    vet(config(model_dir, run_inputs, run, served(proxy.url)), progress=False)
    assert responses(run, OPENAI) == responses(direct, OPENAI)
    assert proxy.passed - passed == 3 + 4  # the missing responses, then the determinism check (2 prompts twice)


def test_a_response_the_server_cuts_short_is_refused(model_dir, run_inputs, server_url, proxy, tmp_path):
    # A gateway that caps max_tokens (or a context window too small): the answer ends at the limit with
    # fewer tokens than asked.
    proxy.rewrite = lambda body: {**body, "max_tokens": 3}
    run = tmp_path / "run"
    with pytest.raises(QuadaError, match=r"cut a response at \d of 10 tokens .* context window"):
        vet(config(model_dir, run_inputs, run, served(proxy.url)), progress=False)
    assert len(responses(run, "none")) == 6 and not responses(run, OPENAI)


def test_chat_completions_are_refused_unless_the_server_shows_its_rendering(model_dir, run_inputs, server_url, tmp_path):
    deployment = f"{OPENAI_CHAT}:{server_url}@{SERVED_NAME}"
    with pytest.raises(QuadaError, match="shows no rendering of its chat template .* vet it with openai:"):
        vet(config(model_dir, run_inputs, tmp_path / "run", deployment), progress=False)


def test_a_nondeterministic_server_is_reported(model_dir, run_inputs, server_url, proxy, tmp_path):
    proxy.rewrite = lambda body: {**body, "temperature": 1.5}  # a server that samples whatever it is sent
    run = tmp_path / "run"
    result = vet(config(model_dir, run_inputs, run, served(proxy.url)), progress=False)
    saved = json.loads((run / "results.json").read_text())
    assert saved["deployments"][served(proxy.url)]["repeats_equal"] == [False, False]
    assert "answered a repeated prompt differently" in result.conditions[1].verdict.reason
    assert "NO (0 of 2 prompts alike" in (run / "report.md").read_text()


def test_the_api_key_comes_from_the_environment_and_is_never_stored(model_dir, run_inputs, tiny_gguf, tmp_path, monkeypatch,
                                                                    allow):
    key = "quada-test-key-7f3a"
    port = free_port()
    allow(port)
    with llama_server(tiny_gguf, tmp_path, "--api_key", key, port=port) as url:
        with pytest.raises(QuadaError, match="refused the request \\(HTTP 401\\).* QUADA_TEST_KEY"):
            vet(config(model_dir, run_inputs, tmp_path / "run", served(url), api_key_env="QUADA_TEST_KEY"), progress=False)
        monkeypatch.setenv("QUADA_TEST_KEY", key)
        vet(config(model_dir, run_inputs, tmp_path / "run", served(url), api_key_env="QUADA_TEST_KEY"), progress=False)
    assert len(responses(tmp_path / "run", OPENAI)) == 6
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_quada_reaches_only_the_deployment_it_was_given(model_dir, run_inputs, server_url, no_network, tmp_path):
    """The network guard here admits the test server's port alone: a second port is refused and logged."""
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", free_port()), timeout=1)
    assert "127.0.0.1:" in no_network.read_text()
    no_network.unlink()  # that attempt was this test's purpose
    vet(config(model_dir, run_inputs, tmp_path / "run", served(server_url)), progress=False)
    assert not no_network.exists()
