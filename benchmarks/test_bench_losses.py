"""pytest-benchmark view of the harness (not collected by ``make test``, which runs ``pytest tests``):

    pytest benchmarks --benchmark-only                        # every provider that runs here
    pytest benchmarks --benchmark-only -k "sdxl and full" --benchmark-json out.json

Same cases, providers and modes as the sweep (``benchmarks/harness.py``); the sweep adds bytes
moved, the roofline, peak memory and the CSV. ``extra_info`` carries bytes moved and GB/s.
"""

from __future__ import annotations

import pytest
import torch

from fastpref import losses
from benchmarks import harness

CASES = [
    harness.Case("sd15", 8),
    harness.Case("sdxl", 8),
    harness.Case("sdxl", 8, "bf16", "shared", "ref_err"),
    harness.Case("sd3", 8),
    harness.Case("sd3", 8, "bf16"),
]
PROVIDERS = ["torch", "torch_compile"] + [f"fastpref-{b}" for b in losses.BACKENDS if b not in ("auto", "torch")]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def available(device):
    """Providers discovered on this device (probed once per pytest run) and the reasons for the rest."""
    found, skipped = harness.discover_providers(device)
    return {p.name: p for p in found}, skipped


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape}x{c.pairs}-{c.dtype}-{c.target}-{c.ref}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_loss(benchmark, available, device, provider, case, mode):
    found, skipped = available
    if provider not in found:
        pytest.skip(skipped.get(provider, f"{provider} not available on {device}"))
    inputs = case.inputs(device)
    loss_fn = found[provider].build(case)
    loss_fn(**inputs).backward()  # compile / build outside the timing
    setup, timed = harness.mode_fns(loss_fn, inputs, mode)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(arg):
        timed(arg)
        sync()

    benchmark.pedantic(run, setup=lambda: ((setup(),), {}), rounds=20, warmup_rounds=3, iterations=1)
    nbytes = case.bytes_moved(mode)
    benchmark.extra_info.update(
        device=harness.device_name(device), bytes_moved=nbytes, gbps=nbytes / benchmark.stats.stats.median / 1e9
    )
