import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# The tests never use the hub: offline mode before any Hugging Face library is imported, so the
# libraries read their (empty) caches instead of probing the network; tests/test_hub.py lifts it.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

GUARD_DIR = Path(__file__).parent / "offline"
sys.path.insert(0, str(GUARD_DIR))
import network_guard  # noqa: E402

network_guard.install()


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests get their own model cache; slow tests reuse the user's converted built-ins."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("QUADA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Fail any test that tries to reach the network, here or in a process it starts."""
    log = tmp_path / "network-attempts.log"
    monkeypatch.setenv(network_guard.LOG_ENV, str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(GUARD_DIR), os.environ.get("PYTHONPATH")])))
    yield log
    if log.exists():
        pytest.fail(f"the test tried to reach the network:\n{log.read_text()}")



@dataclass
class CliRun:
    """What one `quada ...` command line did; output with white space folded (the console wraps)."""

    returncode: int
    stdout: str
    stderr: str

    def assert_user_error(self, *fragments: str) -> None:
        """A user error: exit code 2, one message holding every fragment, no traceback."""
        assert self.returncode == 2, self.stderr
        assert "Traceback" not in self.stderr
        for fragment in fragments:
            assert fragment in self.stderr, self.stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `quada ARGS` in this process through the installed entry point (``quada.cli.main``)."""
    from quada.cli import main

    def run(*args) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["quada", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
        out = capsys.readouterr()
        return CliRun(code, " ".join(out.out.split()), " ".join(out.err.split()))

    return run


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2-style model saved as a Hugging Face model folder (read, never written)."""
    from quada.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2")


@pytest.fixture
def judged_store(tmp_path):
    """A store with four clean responses judged by the keyword and the llm judge."""
    from quada.store import CLEAN, Generation, GenerationKey, Judgement, Store

    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        keys = [GenerationKey("fp", CLEAN, f"p{i}", "{}", 0) for i in range(4)]
        store.put(Generation(k, f"prompt {i}", f"response {i}") for i, k in enumerate(keys))
        store.put(Judgement(k.judged_by("keyword"), i % 2 == 0, 1.0, "") for i, k in enumerate(keys))
        store.put(Judgement(k.judged_by("llm:abc:def"), i < 2, 0.5, "") for i, k in enumerate(keys))
    return db
