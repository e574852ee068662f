import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on shared cores mostly wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
