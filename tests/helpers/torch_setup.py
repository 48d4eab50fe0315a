"""The one fixture that sets torch up for a test, made autouse by the conftest.py of each folder
that trains in this process (`from tests.helpers.torch_setup import one_torch_thread`)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Seed 0 and one intra-op thread for the test, the thread count restored after it. One thread:
    the same float reductions in every run of a test, and the models are tiny, so idle intra-op
    threads only add wake-up latency (tens of ms per optimizer step when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_dynamo() -> None:
    """Forget what earlier tests compiled, counts included (`torch._dynamo.reset` keeps the
    counters), so that a test's count of compiled graphs is its own."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
