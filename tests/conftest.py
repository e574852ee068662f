import pytest


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests get their own model cache; slow tests reuse the user's converted built-ins."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("QUADA_CACHE_DIR", str(tmp_path / "cache"))
