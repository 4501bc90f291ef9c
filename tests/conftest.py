"""Test set-up. Runs before any fastpref kernel module is imported."""

import os
import random
import secrets
import zlib

import torch

# Triton decides at @triton.jit time whether to interpret, so this must precede every import of
# fastpref.ops.*. On a machine with a GPU the kernels run natively.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test starts from a seed derived from its node id (file, name, parameters): its random
    inputs are the same on every run and on every machine, and differ between tests."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture
def fresh_seed(request):
    """A seed drawn fresh on every run (``FASTPREF_TEST_SEED=<n>`` replays one). Printed, so a failing
    test's report shows it under "Captured stdout setup"."""
    seed = int(os.environ.get("FASTPREF_TEST_SEED") or secrets.randbits(48))
    print(f"fresh inputs: seed {seed}; replay with FASTPREF_TEST_SEED={seed} pytest '{request.node.nodeid}'")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


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
