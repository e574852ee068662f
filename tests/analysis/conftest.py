import pytest

from quada.testing import write_tiny_run_inputs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """A saved tiny model, harmful and benign prompt files and a perplexity corpus."""
    return write_tiny_run_inputs(
        tmp_path_factory.mktemp("analysis-inputs"),
        harmful=[f"Harmful request number {i}" for i in range(5)],
        benign=[f"Benign question {i}?" for i in range(5)],
        layers=3,
    )
