import pytest
from datasets import Dataset


def preference_rows(n: int = 8) -> list[dict]:
    """Tiny conversational preference pairs; even rows are harmful requests."""
    return [
        {
            "prompt": [{"role": "user", "content": f"request number {i} " + "x" * (i % 3)}],
            "chosen": [{"role": "assistant", "content": "I'm sorry, I cannot help."}],
            "rejected": [{"role": "assistant", "content": f"Sure, here is step {i}."}],
            "harmful": i % 2 == 0,
        }
        for i in range(n)
    ]


@pytest.fixture
def pairs_dataset():
    return Dataset.from_list(preference_rows())
