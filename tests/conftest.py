"""Suite-wide settings: the CI machine has 2 cores; torch's intra-op threads fight pytest for them."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
