import os
import sys
from pathlib import Path

import pytest

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
