"""Roofline model of the fused pair loss on a GPU: each sweep case's floor, and the split-S choice.

``python -m benchmarks.roofline [--device h100] [--launch-us 4] [--from-json results/gpu-….json]``
prints, for every case of the GPU sweep, the bytes moved, the floor ``max(launch latency, bytes /
bandwidth)`` (the same definition as the harness's ``floor_ms``, here from the datasheet bandwidth,
so a GPU table can be read as "% of floor" before the copy bandwidth is measured), and the model's
time of the fused Triton kernels with the split heuristic of ``fastpref.ops.pair_loss.launch_config``
against the former one.

The model (one streaming kernel; forward and backward are one each, plus the O(B) finalize)::

    programs P = B · splits        each moves b = bytes / P
    slots      = programs_per_sm · SMs          (4 × SMs: 8 warps, ≤ 64 registers, checked by
                                                 tests/test_kernels_compile_for_gpu.py)
    a wave of k ≤ slots programs takes  L + k·b / min(BW, k·F / L)
    t          = launch + Σ over ⌈P / slots⌉ waves

``F`` is the bytes one program has in flight: one 16-byte load per thread and streamed tensor per
iteration (256 threads: 4 KiB per tensor), ``L`` the DRAM latency (Little's law: a wave of k programs
cannot stream faster than k·F per L). With few pairs the grid must be split along S, or a single
wave of B programs leaves most of the ~132 SMs idle and the in-flight bytes far below BW·L; with too
many splits a last, partial wave runs with few programs and again little in flight. Hence the
heuristic: ``splits = ⌊slots / B⌋`` (one full wave, no partial one), at least 1, at most what keeps
each program two blocks long. The former rule, ``splits = min(⌈4·SMs / B⌉, 64)``, made a partial
second wave whenever B does not divide 4·SMs (B = 32 on 132 SMs: 544 programs for 528 slots) and
capped one video pair at 64 programs.

``L`` and the launch latency are inputs, not measurements: the defaults (700 ns, 4 µs) are rough
figures for a PyTorch launch and an HBM load on A100/H100-class parts; ``--from-json`` takes the
launch latency and copy bandwidth measured by a sweep run instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

#: datasheet HBM bandwidth (bytes/s) and SM count of the GPUs the model is for
DEVICES = {
    "a100": ("A100 SXM 80 GB", 2.0e12, 108),
    "h100": ("H100 SXM", 3.35e12, 132),
    "h200": ("H200 SXM", 4.8e12, 132),
}
THREADS = 256  # 8 warps per program (launch_config)
VECTOR_BYTES = 16  # one 128-bit load per thread and tensor per iteration
PROGRAMS_PER_SM = 4


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes/s
    sms: int
    launch_s: float = 4e-6
    latency_s: float = 700e-9

    @property
    def slots(self) -> int:
        return PROGRAMS_PER_SM * self.sms


def device(key: str, launch_us: float | None = None, latency_ns: float | None = None, bandwidth: float | None = None):
    name, bw, sms = DEVICES[key]
    return Device(name, bandwidth or bw, sms, (launch_us or 4.0) * 1e-6, (latency_ns or 700.0) * 1e-9)


def floor_s(nbytes: float, dev: Device) -> float:
    """The floor any implementation must pay: at least one launch, at least the bytes at full bandwidth."""
    return max(dev.launch_s, nbytes / dev.bandwidth)


# ----------------------------------------------------------------------------------------------
# The split heuristic and the wave model
# ----------------------------------------------------------------------------------------------


def block_elements(element_size: int) -> int:
    return THREADS * VECTOR_BYTES // element_size


def splits_heuristic(num_pairs: int, numel: int, element_size: int, sms: int) -> int:
    """``launch_config``'s split count: one full wave of ``4·SMs`` programs, each ≥ two blocks long."""
    block = block_elements(element_size)
    return max(1, min((PROGRAMS_PER_SM * sms) // num_pairs, math.ceil(numel / (2 * block))))


def splits_former(num_pairs: int, numel: int, element_size: int, sms: int) -> int:
    """The rule the heuristic replaced: ⌈4·SMs / B⌉ splits, capped at 64 (and at two blocks each)."""
    block = 2048
    return max(1, min(math.ceil(PROGRAMS_PER_SM * sms / num_pairs), math.ceil(numel / (2 * block)), 64))


def _effective_splits(numel: int, splits: int, block: int) -> int:
    chunk = math.ceil(math.ceil(numel / splits) / block) * block  # as launch_config rounds the chunk
    return math.ceil(numel / chunk)


def kernel_time_s(nbytes: float, tensors: int, programs: int, dev: Device) -> float:
    """Model time of one streaming launch of ``programs`` equal programs moving ``nbytes`` in all."""
    per_program = nbytes / programs
    in_flight = tensors * THREADS * VECTOR_BYTES
    t, left = dev.launch_s, programs
    while left > 0:
        k = min(left, dev.slots)
        t += dev.latency_s + k * per_program / min(dev.bandwidth, k * in_flight / dev.latency_s)
        left -= k
    return t


def fused_time_s(case, dev: Device, splits_rule=splits_heuristic) -> float:
    """Model time of the Triton forward + finalize + backward of a pair-loss case."""
    element_size = 2 if case.dtype == "bf16" else 4
    numel = math.prod(case.sample_shape)
    block = block_elements(element_size) if splits_rule is splits_heuristic else 2048
    splits = _effective_splits(numel, splits_rule(case.pairs, numel, element_size, dev.sms), block)
    programs = case.pairs * splits
    targets = 1 if case.target == "shared" else 2
    fwd_tensors = 2 + targets + (2 if case.ref == "ref_pred" else 0)
    bwd_tensors = 2 + targets + 2
    fwd = kernel_time_s(case.bytes_moved("forward"), fwd_tensors, programs, dev)
    bwd = kernel_time_s(case.bytes_moved("backward"), bwd_tensors, programs, dev)
    return fwd + dev.launch_s + bwd  # + the one-program finalize


def table(dev: Device, cases) -> list[str]:
    lines = [
        f"Roofline model, {dev.name}: {dev.bandwidth / 1e12:.2f} TB/s, {dev.sms} SMs, launch {dev.launch_s * 1e6:.1f} µs, "
        f"DRAM latency {dev.latency_s * 1e9:.0f} ns (model inputs), forward + backward",
        "",
        "| case | MB moved | floor µs | splits (now) | model µs (now) | % of floor | splits (former) | model µs (former) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        nbytes = case.bytes_moved("full")
        fl = floor_s(nbytes, dev)
        element_size = 2 if case.dtype == "bf16" else 4
        numel = math.prod(case.sample_shape)
        now = fused_time_s(case, dev)
        old = fused_time_s(case, dev, splits_former)
        s_now = _effective_splits(numel, splits_heuristic(case.pairs, numel, element_size, dev.sms), block_elements(element_size))
        s_old = _effective_splits(numel, splits_former(case.pairs, numel, element_size, dev.sms), 2048)
        lines.append(
            f"| {case.shape}×{case.pairs} {case.dtype} {case.target} {case.ref} | {nbytes / 1e6:.2f} | {fl * 1e6:.1f} | "
            f"{s_now} | {now * 1e6:.1f} | {100 * fl / now:.0f} | {s_old} | {old * 1e6:.1f} |"
        )
    return lines


def main(argv=None) -> int:
    from benchmarks import sweep

    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--launch-us", type=float, default=None, help="launch latency (default 4 µs)")
    p.add_argument("--latency-ns", type=float, default=None, help="DRAM latency (default 700 ns)")
    p.add_argument("--from-json", default=None, help="a sweep's PREFIX.json: its measured launch latency and copy BW")
    p.add_argument("--preset", default="gpu", choices=("gpu", "gpu-quick", "full"))
    args = p.parse_args(argv)
    bandwidth = None
    if args.from_json:
        facts = json.loads(open(args.from_json).read())["device"]
        args.launch_us, bandwidth = facts["launch_us"], facts["copy_gbps"] * 1e9
    dev = device(args.device, args.launch_us, args.latency_ns, bandwidth)
    cases = [c for c in sweep.preset_cases(args.preset) if c.op == "pair_loss"]
    print("\n".join(table(dev, cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
