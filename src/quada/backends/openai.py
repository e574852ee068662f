"""Any OpenAI-compatible server as a deployment: vLLM, TGI, llama.cpp's server, llama-cpp-python's
server, ``transformers serve``, ...

quada sends ``/v1/completions`` the prompt text it rendered with the model's own chat template,
so the server reads exactly what the other arms read; chat completions (``openai-chat:``) are used
only for a prompt whose rendering by the server, shown through the server's own rendering
endpoint (llama.cpp's ``/apply-template`` or vLLM's ``/tokenize``), equals quada's.

Sampling defaults of the server never leak in: every request sends greedy settings explicitly
(:data:`GREEDY`: temperature 0, top-p 1, no penalties, including the repeat penalty of 1.1 that
llama-cpp-python's server applies by default), the same token budget as the reference, and no
stop strings (a response ends at the model's end of sequence or the budget; the reference's
stop-on-refusal rule is applied to the returned text, cut at the same token). Each response is
checked: the server must have read as many prompt tokens as the reference tokenizer reads
(otherwise it added a BOS token, did not parse special tokens, or renders another template), and
a response that ends at the budget with fewer tokens than asked was truncated by the server (its
context window) and is refused.

Failures end in one message and lose nothing (responses are stored one by one): an unreachable
server fails the check before any model work within :data:`CONNECT_TIMEOUT` seconds; a served
name the server does not list is refused (llama-cpp-python's server would silently answer with
its default model); HTTP 429 and 5xx answers, dropped connections, timeouts and cut-off bodies
are retried with exponential backoff (honouring ``Retry-After``), and when the retries run out
the run stops with the stored responses kept, so the same command resumes. The API key is read
from an environment variable, sent as a bearer token, and never stored, printed or keyed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from quada.backends import (
    LENGTH,
    OPENAI_CHAT,
    REFUSAL,
    STOP,
    Completion,
    Deployment,
    Rendered,
    refusal_cut,
)
from quada.errors import QuadaError
from quada.measures.generate import GenerationSettings

CONNECT_TIMEOUT = 5.0  # seconds to reach the server (and, for the first check, to answer it)
BACKOFF = 1.0  # seconds before the first retry; doubled for each further one
MAX_WAIT = 60.0  # seconds: the longest backoff or Retry-After that is honoured
RETRYABLE = {429, 500, 502, 503, 504}
# Greedy decoding, stated explicitly so that no server default applies: the standard OpenAI
# parameters, then the repetition penalties of llama.cpp (repeat_penalty) and of vLLM/TGI
# (repetition_penalty), both off.
GREEDY = {
    "temperature": 0.0, "top_p": 1.0, "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repeat_penalty": 1.0, "repetition_penalty": 1.0,
}


class _Transient(Exception):
    """A failure worth retrying: the server may answer the same request later (after
    ``retry_after`` seconds, when it said so)."""

    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def rendering_mismatch(expected: str | Sequence[int], served: str | Sequence[int]) -> str | None:
    """Where the server's rendering of a conversation (text or token ids) first differs from quada's,
    in words, or ``None`` when they are the same."""
    if list(expected) == list(served):
        return None
    at = next((i for i, (a, b) in enumerate(zip(expected, served)) if a != b), min(len(expected), len(served)))
    unit = "character" if isinstance(expected, str) else "token"
    return (f"the server's rendering has {len(served)} {unit}s where quada's has {len(expected)}, first differing at "
            f"{unit} {at}" + (f" ({served[at:at + 40]!r} against {expected[at:at + 40]!r})" if isinstance(expected, str) else ""))


class Client:
    """HTTP to one OpenAI-compatible server: JSON requests, a bearer key from the environment."""

    def __init__(self, url: str, api_key_env: str = "OPENAI_API_KEY"):
        parts = urlsplit(url)
        self.url, self.path = url, parts.path
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._key = os.environ.get(api_key_env) or None
        self._key_env = api_key_env

    def exchange(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        """One request to ``path`` (from the server's root) and its JSON answer: :class:`_Transient` for
        what a retry may cure, :class:`QuadaError` for what it cannot."""
        connection_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = connection_class(self._host, self._port, timeout=CONNECT_TIMEOUT)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        try:
            connection.connect()
            connection.sock.settimeout(timeout)
            connection.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (TimeoutError, socket.timeout) as err:
            raise _Transient(f"no answer within {timeout:g} s") from err
        except (ConnectionError, http.client.HTTPException, OSError) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err
        finally:
            connection.close()
        if response.status in RETRYABLE:
            raise _Transient(f"HTTP {response.status}: {_excerpt(data)}", response.getheader("Retry-After"))
        if response.status in (401, 403):
            raise QuadaError(
                f"the server at {self.url} refused the request (HTTP {response.status}): put its API key in the "
                f"environment variable {self._key_env} (or name another with --api-key-env)"
            )
        if response.status == 404:
            raise QuadaError(
                f"the server at {self.url} has no {path} (HTTP 404): give the API root of an OpenAI-compatible "
                "server, usually ending in /v1"
            )
        if response.status >= 400:
            raise QuadaError(
                f"the server at {self.url} rejected the request to {path} (HTTP {response.status}): {_excerpt(data)}"
            )
        try:
            return json.loads(data)
        except ValueError as err:  # a body cut off on its way, or a proxy's page
            raise _Transient(f"an answer that is not JSON ({len(data)} bytes)") from err


def check_served(deployment: Deployment, api_key_env: str = "OPENAI_API_KEY") -> None:
    """Fail within :data:`CONNECT_TIMEOUT` seconds on a server that does not answer, and on a model
    name that it does not list (llama-cpp-python's server answers any name with its default model)."""
    client = Client(deployment.target, api_key_env)
    try:
        listing = client.exchange("GET", client.path + "/models", None, CONNECT_TIMEOUT)
    except _Transient as err:
        raise QuadaError(
            f"cannot reach an OpenAI-compatible server at {client.url} ({err}); start the server, or check the "
            "host, port and path of the deployment"
        ) from err
    entries = listing.get("data", []) if isinstance(listing, dict) else []
    served = [entry.get("id") for entry in entries if isinstance(entry, dict)]
    if deployment.served_name not in served:
        raise QuadaError(
            f"the server at {client.url} does not serve a model named {deployment.served_name!r} (it lists "
            f"{', '.join(map(repr, served)) or 'none'}); give one of those names after the @"
        )


class OpenAIBackend:
    """A model served by an OpenAI-compatible server; see the module docstring."""

    def __init__(self, deployment: Deployment, tokenizer, api_key_env: str = "OPENAI_API_KEY",
                 request_timeout: float = 300.0, retries: int = 6):
        check_served(deployment, api_key_env)
        self.client = Client(deployment.target, api_key_env)
        self.url, self.served_name, self.chat = deployment.target, deployment.served_name, deployment.kind == OPENAI_CHAT
        self.tokenizer, self.request_timeout, self.retries = tokenizer, request_timeout, retries
        self.condition = str(deployment)
        self.identity = {
            "backend": "openai", "api": "chat/completions" if self.chat else "completions",
            "base_url": self.url, "model": self.served_name, "request": GREEDY,
        }

    def _call(self, path: str, body: dict, what: str) -> dict:
        return post(self.client, path, body, what, self.request_timeout, self.retries)

    # ------------------------------------------------------------------ generation

    def complete(self, prompt: Rendered, settings: GenerationSettings) -> Completion:
        request = {"model": self.served_name, "max_tokens": settings.max_new_tokens, "stream": False, **GREEDY}
        what = f"a prompt of {len(prompt.text)} characters"
        if self.chat:
            self._check_rendering(prompt)
            answer = self._call("/chat/completions", {**request, "messages": list(prompt.messages)}, what)
        else:
            answer = self._call("/completions", {**request, "prompt": prompt.text}, what)
        text, finish, usage = _parse(answer, self.chat, self.url)
        expected = len(self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
        if usage["prompt_tokens"] != expected:
            raise QuadaError(
                f"the server at {self.url} read {usage['prompt_tokens']} prompt tokens where the reference tokenizer "
                f"reads {expected}: it does not read the prompt the reference reads (it adds a BOS token, does not "
                "parse special tokens, or renders another chat template); serve the reference model's tokenizer, or "
                "vet with openai: (completions) if this was openai-chat:"
            )
        if finish == "length" and usage["completion_tokens"] < settings.max_new_tokens:
            raise QuadaError(
                f"the server at {self.url} cut a response at {usage['completion_tokens']} of {settings.max_new_tokens} "
                f"tokens (after a prompt of {expected}): its context window or its own token limit is too small; "
                "raise it (llama.cpp: --n_ctx) or lower --max-new-tokens. The responses before it are stored"
            )
        tokens = usage["completion_tokens"]
        if settings.stop_on_refusal:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cut = refusal_cut(lambda n: self.tokenizer.decode(ids[:n], skip_special_tokens=True), len(ids))
            if cut is not None:
                return Completion(self.tokenizer.decode(ids[:cut], skip_special_tokens=True), cut, REFUSAL)
        return Completion(text, tokens, LENGTH if finish == "length" else STOP)

    def _check_rendering(self, prompt: Rendered) -> None:
        """Refuse chat completions unless the server shows that it renders ``prompt.messages`` to
        quada's text: llama.cpp's server through ``/apply-template`` (text), vLLM through
        ``/tokenize`` (token ids)."""
        root = self.client.path.removesuffix("/v1")
        probes = [
            (root + "/apply-template", {"messages": list(prompt.messages)}, "prompt", prompt.text),
            (root + "/tokenize", {"model": self.served_name, "messages": list(prompt.messages),
                                  "add_generation_prompt": True, "add_special_tokens": False},
             "tokens", self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]),
        ]
        for path, body, field, expected in probes:
            try:
                shown = self.client.exchange("POST", path, body, self.request_timeout)
            except (QuadaError, _Transient):
                continue
            if field in shown:
                problem = rendering_mismatch(expected, shown[field])
                if problem is None:
                    return
                raise QuadaError(
                    f"the server at {self.url} renders the chat template differently from the reference model ({problem}); "
                    f"its chat completions would read another prompt: vet it with openai:{self.url}@{self.served_name} "
                    "(completions), which sends quada's rendered text"
                )
        raise QuadaError(
            f"the server at {self.url} shows no rendering of its chat template (neither llama.cpp's /apply-template nor "
            "vLLM's /tokenize answered), so quada cannot check that its chat completions read the prompt the reference "
            f"reads; vet it with openai:{self.url}@{self.served_name} (completions), which sends quada's rendered text"
        )

    def perplexity(self, windows) -> None:
        """Not measured: the completions API cannot be given token ids portably, and scoring
        re-tokenized text would compare other tokens than the reference's."""
        return None

    def close(self) -> None:
        pass


TOP_LOGPROBS = 20  # alternatives a judge asks the server for at its answer position


class OpenAIScorer:
    """A judge's model behind an OpenAI-compatible server (``--judge-model openai:<URL>@<name>``).

    A judge's input goes as one chat turn list (``chat``: the server renders its own chat template,
    as a guard model's server does) or as raw text to ``/v1/completions`` (a classifier's published
    prompt, which carries its own format). The answer is read from the first generated token: the
    probability of each answer group is the sum of the probabilities of the ``top_logprobs``
    alternatives that spell one of its words (case and surrounding space ignored). A server that
    returns no log-probabilities is still usable: the answer is then read from the text (the
    first word of up to :data:`TEXT_TOKENS` tokens), its probability taken as 1, and the judge's
    identity says so (``answers_from``), so that its verdicts never mix with scored ones.
    """

    TEXT_TOKENS = 4

    def __init__(self, target: str, api_key_env: str = "OPENAI_API_KEY", request_timeout: float = 300.0,
                 retries: int = 6):
        from quada.backends import OPENAI, base_url

        url, at, name = target.rpartition("@")
        if not at or not url or not name:
            raise QuadaError(f"the judge model openai:{target} names no model: write openai:<base URL>@<model name>")
        deployment = Deployment(OPENAI, base_url(url), name)
        check_served(deployment, api_key_env)
        self.client = Client(deployment.target, api_key_env)
        self.url, self.served_name = deployment.target, name
        self.request_timeout, self.retries = request_timeout, retries
        self.logprobs = self._gives_logprobs()
        self.identity = {"backend": "openai", "base_url": self.url, "model": name, "request": GREEDY,
                         "answers_from": "logprobs" if self.logprobs else "text"}
        self.fingerprint = f"openai-{hashlib.sha256(f'{self.url}@{name}'.encode()).hexdigest()[:16]}"

    def _gives_logprobs(self) -> bool:
        """Whether the server returns the log-probabilities of a chat answer's first token."""
        answer = self._ask({"messages": [{"role": "user", "content": "Answer yes or no: is 2 larger than 1?"}]}, 1,
                           "a check for log-probabilities")
        return _top_logprobs(answer, chat=True) is not None

    def _ask(self, body: dict, max_tokens: int, what: str) -> dict:
        chat = "messages" in body
        request = {"model": self.served_name, "max_tokens": max_tokens, "stream": False, **GREEDY, **body}
        if chat:
            request |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        else:
            request["logprobs"] = TOP_LOGPROBS
        return post(self.client, "/chat/completions" if chat else "/completions", request, what,
                    self.request_timeout, self.retries)

    def answer_probabilities(self, prompt: list[dict[str, str]] | str, answers: Sequence[Sequence[str]]) -> list[float]:
        """The probability of each answer group at the first answer token after ``prompt`` (chat turns
        or raw text); from the text where the server gives no log-probabilities (1 for the group
        the answer's first word belongs to, 0 for the others)."""
        chat = not isinstance(prompt, str)
        body = {"messages": prompt} if chat else {"prompt": prompt}
        what = f"a judge input of {len(json.dumps(prompt))} characters"
        words = [{word.strip().lower() for word in group} for group in answers]
        if self.logprobs:
            alternatives = _top_logprobs(self._ask(body, 1, what), chat)
            if alternatives is None:
                raise QuadaError(
                    f"the judge server at {self.url} returned no log-probabilities for an answer although it did for "
                    "the first; a server must answer alike throughout a run: check its configuration"
                )
            probabilities = [0.0] * len(words)
            for token, logprob in alternatives:
                if (group := _answer_group(token, words)) is not None:
                    probabilities[group] += math.exp(logprob)
            return probabilities
        answer = self._ask(body, self.TEXT_TOKENS, what)
        text = _text_of(answer, chat, self.url).strip().lower()
        group = _answer_group(text.split()[0].strip(".,:;!\"'") if text.split() else "", words)
        matched = [1.0 if i == group else 0.0 for i in range(len(words))]
        if group is None:
            raise QuadaError(
                f"the judge server at {self.url} answered {text[:40]!r}, which is none of the answers "
                f"{[sorted(g) for g in words]}: the served model does not answer in this judge's format; give the "
                "judge format its model was trained on (--judges guard, or --judge-prompt FILE)"
            )
        return matched

    def close(self) -> None:
        pass


def _answer_group(token: str, words: Sequence[set[str]]) -> int | None:
    """The answer group a generated token (or word) begins: the one group with a word that starts
    with it (case and surrounding space ignored), as a local judge reads an answer by its first
    token; None for a token that begins no group's word, or more than one group's."""
    text = token.strip().lower()
    groups = [i for i, group in enumerate(words) if text and any(word.startswith(text) for word in group)]
    return groups[0] if len(groups) == 1 else None


def _top_logprobs(answer: dict, chat: bool) -> list[tuple[str, float]] | None:
    """``(token text, log-probability)`` of the alternatives at an answer's first token, or None when
    the answer carries none."""
    try:
        choice = answer["choices"][0]
        if chat:
            first = choice["logprobs"]["content"][0]
            return [(alt["token"], float(alt["logprob"])) for alt in first["top_logprobs"]] or None
        top = choice["logprobs"]["top_logprobs"][0]
        return [(token, float(p)) for token, p in top.items()] or None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def _text_of(answer: dict, chat: bool, url: str) -> str:
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError) as err:
        raise QuadaError(f"the judge server at {url} answered without the fields of an OpenAI completion") from err
    if not isinstance(text, str):
        raise QuadaError(f"the judge server at {url} answered a completion whose text is not a string")
    return text


def post(client: Client, path: str, body: dict, what: str, timeout: float, retries: int) -> dict:
    """A POST to ``path`` under the API root of ``client``'s server, retried with exponential backoff
    (``retries`` times, each attempt given ``timeout`` seconds); a :class:`QuadaError` when the
    retries run out."""
    for attempt in range(retries + 1):
        try:
            return client.exchange("POST", client.path + path, body, timeout)
        except _Transient as err:
            if attempt == retries:
                raise QuadaError(
                    f"the server at {client.url} stopped answering ({err}) on {what}, after {retries + 1} "
                    "attempts with backoff; the results received so far are stored: run the same command "
                    "again once the server is back, and it continues where it stopped"
                ) from err
            time.sleep(_wait(err, attempt))
    raise AssertionError("unreachable")


def _wait(err: _Transient, attempt: int) -> float:
    """Seconds before the next attempt: the server's ``Retry-After`` when it sent one (in seconds),
    else exponential backoff; at most :data:`MAX_WAIT`."""
    if err.retry_after is not None:
        try:
            return min(MAX_WAIT, max(0.0, float(err.retry_after)))
        except ValueError:  # an HTTP date: fall back to the backoff
            pass
    return min(MAX_WAIT, BACKOFF * 2**attempt)


def _parse(answer: dict, chat: bool, url: str) -> tuple[str, str, dict]:
    """The text, finish reason and token usage of a completion answer, or a :class:`QuadaError`."""
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = {k: int(answer["usage"][k]) for k in ("prompt_tokens", "completion_tokens")}
        finish = choice.get("finish_reason") or ""
    except (KeyError, IndexError, TypeError, ValueError) as err:
        # The answer itself may hold a harmful response: name its fields only.
        fields = ", ".join(sorted(answer)) if isinstance(answer, dict) else type(answer).__name__
        raise QuadaError(
            f"the server at {url} answered without the fields of an OpenAI completion (choices with text, usage "
            f"with prompt_tokens and completion_tokens); it sent: {fields or 'nothing'}"
        ) from err
    if not isinstance(text, str):
        raise QuadaError(f"the server at {url} answered a completion whose text is {type(text).__name__}, not a string")
    return text, finish, usage


def _excerpt(data: bytes, limit: int = 300) -> str:
    """The start of a server's error answer, for an error message (completions never reach here)."""
    text = data.decode("utf-8", "replace").strip()
    return text[:limit] + ("..." if len(text) > limit else "")
