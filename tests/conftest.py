"""Test set-up. Without a CUDA GPU, Triton kernels run in the interpreter: TRITON_INTERPRET
must be set before any @triton.jit function is defined, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Test problems are tiny: a second OpenMP thread only adds synchronisation (measured 20x
# slower per tiny training step on a loaded 2-core machine), so tests run on one thread.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever the previous one set (e.g. `--threads`)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
