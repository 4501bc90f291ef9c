"""The C++ CPU op against the copy bandwidth and ``torch.compile``, timed in interleaved rounds.

``python -m benchmarks.cpu_op [--threads 1] [--rounds 7] [--cases sd15x16:fp32,…]``

For each case (``dmpo_loss`` with ``ref_pred`` and a full target, forward + backward) the providers
run one after the other inside every round — ``copy`` (``dst.copy_(src)`` of the op's 6N·s bytes:
3N·s read + 3N·s written, the machine's streaming rate right now), ``compile`` (``torch.compile`` of
the eager reference), ``fastpref`` (the C++ op) — so a load spike from other processes hits every
provider of a round alike. Each provider's step ends by dropping its own gradient (``model.grad =
None``, as ``zero_grad(set_to_none=True)`` in a loop), so it pays for freeing what it allocated and
never for what the provider before it left behind (measured: freeing ``torch.compile``'s fresh 32 MiB
bf16 gradient at SD3×32 cost the next provider ~3 ms). Before each timed call a small add on every
intra-op thread wakes the thread pool, untimed, as the model's own ops leave it in a training step:
waking a pool thread that has gone to sleep cost ~0.1 ms per two-thread forward + backward (two
parallel regions) at SD1.5×16 on the 2-vCPU VM, which would otherwise land on the timed call; the table gives medians over rounds of wall and process CPU time, the
op's bandwidth as % of the copy's, and its speed-up over compile. The machine is shared: read the
ratios, and the load average printed with them, not the absolute times.

``--threads 1,2`` interleaves thread counts as well: inside every round each provider runs at each
count (``torch.set_num_threads``) in turn, and a second table gives the scaling, wall time at the
first count over wall time at each other one, per provider. ``tiny`` (4 pairs of 4×8×8 latents) is
the per-call overhead: the Python front end, the dispatcher and autograd, almost no data. ``--op``
adds the provider ``op``: the same forward and backward kernels called through ``torch.ops`` with
no front end and no autograd, so ``fastpref`` − ``op`` is what the Python layers and autograd cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import fastpref
from fastpref import reference
from fastpref.ops.family import LOSS_IDS, REDUCTION_IDS, kernel_scalars

#: name → (sample shape, pairs); the issue's three cases and the CPU sweep's larger ones
SHAPES = {
    "tiny": ((4, 8, 8), 4),
    "sd15x16": ((4, 64, 64), 16),
    "sdxlx16": ((4, 128, 128), 16),
    "sd3x8": ((16, 128, 128), 8),
    "sd3x32": ((16, 128, 128), 32),
}
DEFAULT = "sd15x16:fp32,sdxlx16:bf16,sd3x8:bf16,sd3x8:fp32,sd3x32:fp32,sd3x32:bf16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(shape, pairs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    target = torch.randn((n, *shape), generator=g).to(dtype)
    ref = (target.float() + torch.randn((n, *shape), generator=g)).to(dtype)
    model = (ref.float() + 0.3 * torch.randn((n, *shape), generator=g)).to(dtype).requires_grad_(True)
    return model, ref, target


def _eager(model, ref, target):
    return reference.pair_loss_ref("dmpo", model, ref, target, beta=5000.0, alpha=0.01)[0]


def _fastpref(model, ref, target):
    return fastpref.dmpo_loss(model, ref, target, beta=5000.0, alpha=0.01, backend="cpu")


_POOL = torch.zeros(1 << 18)  # 1 MiB: above ATen's grain size, so add_ runs on every intra-op thread


def _timed(fn):
    _POOL.add_(1.0)  # wake the intra-op threads (untimed), as the model's own ops leave them in training
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def run_case(name, dtype_name, rounds, log=print, threads=(1,), op=False):
    """Time the providers on one case, interleaved in every round (and over ``threads``); returns one
    row per thread count (medians over rounds) and logs each."""
    shape, pairs = SHAPES[name]
    dt = DTYPES[dtype_name]
    model, ref, target = inputs(shape, pairs, dt)
    nbytes = 6 * model.numel() * model.element_size()
    src = torch.empty(nbytes // 2, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    compiled = torch.compile(_eager, dynamic=False)

    def step(fn):
        def go():  # frees its own gradient, as zero_grad(set_to_none=True) does in a training loop
            fn(model, ref, target).backward()
            model.grad = None

        return go

    providers = {"copy": lambda: dst.copy_(src), "compile": step(compiled), "fastpref": step(_fastpref)}
    if op:  # the kernels alone: forward + backward through torch.ops, no front end, no autograd
        detached, upstream = model.detach(), torch.ones(())
        scalars = kernel_scalars("dmpo", beta=5000.0, alpha=0.01)
        ids = LOSS_IDS["dmpo"], REDUCTION_IDS["mean"]

        def op_only():
            out = torch.ops.fastpref.pair_loss_fwd(detached, ref, target, None, ids[0], *scalars, ids[1])
            torch.ops.fastpref.pair_loss_bwd(upstream, detached, target, out[3], ids[1])

        providers["op"] = op_only
    for th in threads:  # warm-up: compile, build, first-touch, each thread count's pool
        torch.set_num_threads(th)
        for fn in providers.values():
            fn()
            fn()
    times = {(th, k): [] for th in threads for k in providers}
    for _ in range(rounds):
        for th in threads:
            torch.set_num_threads(th)
            for k, fn in providers.items():
                times[th, k].append(_timed(fn))
    rows = []
    for th in threads:
        med = {k: (statistics.median(w for w, _ in times[th, k]), statistics.median(c for _, c in times[th, k]))
               for k in providers}  # fmt: skip
        row = {
            "case": f"{name} {dtype_name}",
            "threads": th,
            "MiB": nbytes / 2**20,
            **{f"{k} ms": med[k][0] * 1e3 for k in providers},
            **{f"{k} cpu ms": med[k][1] * 1e3 for k in providers},
            "% copy BW": 100 * med["copy"][0] / med["fastpref"][0],
            "% copy BW (cpu)": 100 * med["copy"][1] / med["fastpref"][1],
            "vs compile": med["compile"][0] / med["fastpref"][0],
            "vs compile (cpu)": med["compile"][1] / med["fastpref"][1],
            "load": os.getloadavg()[0],
        }
        log(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
        rows.append(row)
    return rows


def scaling(rows):
    """Wall-time scaling of each provider from the first thread count to each other one."""
    base = rows[0]
    out = []
    for row in rows[1:]:
        out.append({"case": row["case"], "threads": f"{base['threads']} → {row['threads']}",
                    **{k: base[f"{k} ms"] / row[f"{k} ms"] for k in ("copy", "compile", "fastpref")},
                    "load": row["load"]})  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_op", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1", help="torch threads, or a comma-separated list to interleave (1,2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cases", default=DEFAULT, help=f"comma-separated name:dtype, names {sorted(SHAPES)}")
    p.add_argument("--op", action="store_true", help="also time the op's kernels alone (no front end, no autograd)")
    args = p.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    print(f"# thread counts {threads}, torch {torch.__version__}, load average {os.getloadavg()}")
    cols = ["case", "threads", "MiB moved", "copy ms", "compile ms", "fastpref ms", "copy CPU ms", "compile CPU ms",
            "fastpref CPU ms", "% copy BW", "% copy BW (CPU time)", "vs compile", "vs compile (CPU time)", "load"]  # fmt: skip
    if args.op:
        cols[6:6] = ["op ms"]
        cols[10:10] = ["op CPU ms"]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    rows = []
    for spec in args.cases.split(","):
        name, dtype_name = spec.split(":")
        rows.append(run_case(name, dtype_name, args.rounds, log=lambda line: print(f"| {line} |", flush=True),
                             threads=threads, op=args.op))  # fmt: skip
    if len(threads) > 1:
        print("\nScaling, wall time at the first thread count / at the other:\n")
        print("| case | threads | copy | compile | fastpref | load |\n|" + " --- |" * 6)
        for case_rows in rows:
            for r in scaling(case_rows):
                print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print(f"# load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
