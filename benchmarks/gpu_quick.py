"""The first look at a GPU in one command: ``make bench-gpu-quick`` (``python -m benchmarks.gpu_quick``).

On a CUDA machine whose ``python3`` has torch and triton (no diffusers, open_clip or package registry
needed), in a few minutes:

1. the GPU parity tests — the Triton kernels against the PyTorch reference on the device
   (``tests/test_losses.py``, ``test_triton.py``, ``test_rpo.py``; skipped with a message where
   pytest is not installed: the sweep still compares every provider with eager, step 2);
2. the sweep preset ``gpu-quick`` (SD1.5/SDXL/SD3 × 1 and 8 pairs, bf16, SD1.5 at 520 px × 8 — a sample
   size off the 16-element grid — and RPO M = 64 and 1024): eager,
   ``torch.compile`` and the fused kernels, forward / backward / full; fails if a fused result is far
   from eager (relative error > :data:`MAX_REL_ERR`);
3. the roofline table (``benchmarks/roofline.py``) with the launch latency and copy bandwidth measured
   in step 2, and each case's measured time as a % of its floor.

Writes ``benchmarks/results/gpu-quick-<device>.{csv,md,json,png}`` and ``…-roofline.md``.
``--dry-run`` runs every step on a CPU with the Triton interpreter (no timing is meaningful; the
tests of the suite use it), so a GPU run needs no debugging of this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = ("tests/test_losses.py", "tests/test_triton.py", "tests/test_rpo.py")
#: a fused result this far from eager (max relative error of loss or gradient) is a bug, not rounding
MAX_REL_ERR = 0.05
#: packages a bare GPU image lacks; nothing this script imports may need them
NOT_NEEDED = ("diffusers", "open_clip", "transformers", "accelerate", "peft")


def parity_tests(log=print) -> int:
    if importlib.util.find_spec("pytest") is None:
        log("parity tests: skipped (pytest is not installed here); the sweep compares every provider with eager")
        return 0
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *PARITY_TESTS]
    log("parity tests: " + " ".join(cmd[1:]))
    return subprocess.run(cmd, cwd=ROOT).returncode


def check_rows(rows, log=print) -> list[str]:
    """Rows whose fused result is far from eager."""
    bad = [
        f"{r['provider']} {r['shape']}×{r['pairs']} {r['dtype']}: rel err {r['rel_err_vs_eager']:.2e}"
        for r in rows
        if r["provider"].startswith("fastpref-") and r["mode"] == "full"
        and not (math.isfinite(r["rel_err_vs_eager"]) and r["rel_err_vs_eager"] <= MAX_REL_ERR)
    ]  # fmt: skip
    for line in bad:
        log("FAR FROM EAGER: " + line)
    return bad


def roofline_report(rows, facts, path: Path, device_key: str) -> str:
    """The roofline table for the measured device, and the fused provider's measured time as % of floor."""
    from benchmarks import roofline

    dev = roofline.device(device_key, launch_us=facts.launch_us, bandwidth=facts.copy_gbps * 1e9)
    lines = [f"# Roofline, {facts.name} (model: `benchmarks/roofline.py`; {device_key} SM count)", ""]
    lines += [f"Launch latency {facts.launch_us:.1f} µs (a one-element op) and copy bandwidth {facts.copy_gbps:.1f} GB/s "
              "(read + write) as measured in this run.", ""]
    lines += ["| case | provider | MB moved | floor µs | measured µs | % of floor |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["mode"] != "full" or r["op"] != "pair_loss":
            continue
        fl = roofline.floor_s(r["bytes_moved"], dev)
        lines.append(
            f"| {r['shape']}×{r['pairs']} {r['dtype']} | {r['provider']} | {r['bytes_moved'] / 1e6:.2f} | {fl * 1e6:.1f} | "
            f"{r['ms_median'] * 1e3:.1f} | {100 * fl / (r['ms_median'] * 1e-3):.0f} |"
        )
    from benchmarks import sweep

    cases = [c for c in sweep.preset_cases("gpu-quick")]
    lines += ["", *roofline.table(dev, cases), ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def device_key(name: str) -> str:
    name = name.lower()
    return "a100" if "a100" in name else "h200" if "h200" in name else "h100"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on a CPU, Triton interpreted: every step, no timing")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/gpu-quick-<device>)")
    p.add_argument("--no-tests", action="store_true", help="skip step 1")
    p.add_argument("--shapes", default=None, help="comma-separated subset of sd15,sdxl,sd3,sd15-odd (default all)")
    p.add_argument("--pairs", default=None, help="comma-separated subset of 1,8 (default both)")
    p.add_argument("--rpo", default=None, help="comma-separated RPO sizes M (default 64,1024)")
    p.add_argument("--providers", default=None, help="comma-separated subset, e.g. torch,fastpref-triton")
    args = p.parse_args(argv)
    started = time.time()

    import torch

    from benchmarks import harness, sweep

    loaded = [m for m in NOT_NEEDED if m in sys.modules]
    if loaded:
        print(f"error: importing the benchmarks pulled in {loaded}; a bare GPU image has none of them")
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("make bench-gpu-quick needs a CUDA device (torch sees none); `--dry-run` checks it on a CPU")
        return 2
    if args.dry_run:
        from fastpref.ops.pair_loss import interpreter_enabled

        if not interpreter_enabled():
            print("--dry-run runs Triton through its interpreter: set TRITON_INTERPRET=1 before starting Python")
            return 2

    status = 0
    if not args.no_tests:
        status = parity_tests() if not args.dry_run else 0
        if args.dry_run:
            print("parity tests: not run in a dry run (the test suite runs them on the CPU)")
    result = sweep.run(
        "gpu-quick",
        device="cpu" if args.dry_run else "cuda",
        providers=tuple(args.providers.split(",")) if args.providers else None,
        out=args.out,
        shapes=tuple(args.shapes.split(",")) if args.shapes else None,
        rpo_ms=tuple(int(m) for m in args.rpo.split(",")) if args.rpo else None,
        pairs=tuple(int(b) for b in args.pairs.split(",")) if args.pairs else None,
        timing=harness.Timing(warmup=0, min_reps=1, max_reps=1, budget_s=0.0) if args.dry_run else None,
        memory=not args.dry_run,
        plot=not args.dry_run,
        interpreted_triton=args.dry_run,
    )
    bad = check_rows(result["rows"])
    prefix = result["paths"]["csv"].with_suffix("")
    roof = roofline_report(result["rows"], result["facts"], Path(f"{prefix}-roofline.md"), device_key(result["facts"].name))
    print(roof)
    print(f"bench-gpu-quick: {time.time() - started:.0f} s; tables in {prefix}.md and {prefix}-roofline.md")
    return 1 if (status or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
