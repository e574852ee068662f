import pytest

from quada.testing import tiny_model


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """A saved tiny model, harmful and benign prompt files and a perplexity corpus."""
    root = tmp_path_factory.mktemp("analysis-inputs")
    model, tokenizer = tiny_model("qwen2", seed=3, layers=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "harmful.txt").write_text("\n".join(f"Harmful request number {i}" for i in range(5)))
    (root / "benign.txt").write_text("\n".join(f"Benign question {i}?" for i in range(5)))
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    return root
