import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny batches, where a second thread on a shared 2-core box costs more than it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
