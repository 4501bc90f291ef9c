"""Test set-up. Runs before any fastpref kernel module is imported."""

import os

import torch

# Triton decides at @triton.jit time whether to interpret, so this must precede every import of
# fastpref.ops.*. On a machine with a GPU the kernels run natively.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: thread start-up costs more than it saves, and the CI machine has 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
