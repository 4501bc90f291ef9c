"""The one benchmark harness: cases, providers, timing, peak memory, bytes moved, device facts.

Every measurement goes through :func:`run_case`, which returns CSV rows (:data:`COLUMNS`); the sweep
(:mod:`benchmarks.sweep`) and the pytest-benchmark tests only choose cases and providers.

Providers
    ``torch``          the eager reference, :func:`fastpref.reference.pair_loss_ref` — the loss lines
                       of the diffusers DPO scripts and the Salesforce code (square, mean over S, chunk
                       into winners/losers, margin, ``logsigmoid``) with the inputs upcast to fp32 as
                       the reference specifies; autograd backward.
    ``torch_compile``  ``torch.compile`` of that same function (static shapes, recompiled per case).
    ``fastpref-<b>``   ``fastpref.dpo_loss``/``dmpo_loss`` with ``backend=b`` for every backend in
                       :data:`fastpref.losses.BACKENDS` that runs on the device (discovered at run time,
                       so a new backend shows up without editing this file; ``auto`` is an alias and
                       ``torch`` is the eager provider). Triton on a CPU runs only through its
                       interpreter, a correctness tool (~0.3 ms per op per program): never timed.

Cases: :class:`Case` (the pair loss) and ``benchmarks.rpo.RpoCase`` (the RPO M×M loss) each know
their inputs, their eager function, their fastpref call and their bytes moved; everything else here
is shared.

Modes: ``forward`` (the loss with ``model_pred.requires_grad``, as in training), ``backward``
(``loss.backward()`` alone, the forward run untimed before each repetition), ``full`` (both).

Times: wall time per call (CUDA events after an L2 flush on a GPU, ``perf_counter`` on a CPU), its
median, p20 and p80; on a CPU also the median process CPU time, which — unlike wall time — does not
grow while other processes hold the cores (the machines here are shared; each row records the load).

Bytes moved (the floor any implementation must move; the same for every provider), with
N = 2B·D elements of s bytes: forward reads ``model_pred``, ``ref_pred`` (not with ``ref_err``) and
``target`` (half of it when shared by a pair): (1 + r + t)·N·s; backward reads ``model_pred`` and
``target`` and writes the gradient: (2 + t)·N·s. The roofline is the device's copy bandwidth
measured in the same run (``dst.copy_(src)``, read + write), and the floor time is
``max(launch latency, bytes / copy bandwidth)`` with the launch latency that of a one-element op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import platform
import time
from typing import Callable

import numpy as np
import torch

import fastpref
from fastpref import losses, reference

__all__ = [
    "COLUMNS",
    "DTYPES",
    "MODES",
    "SHAPES",
    "Case",
    "DeviceFacts",
    "Provider",
    "discover_providers",
    "measure",
    "measure_device",
    "peak_memory",
    "run_case",
    "Timing",
]

MODES = ("forward", "backward", "full")

#: latent shapes per sample (C, H, W) or (F, C, H, W)
SHAPES = {
    "tiny": (4, 8, 8),  # smoke tests only
    "sd15": (4, 64, 64),  # SD1.5, 512 px
    "sd15-odd": (4, 65, 65),  # SD1.5 at 520 px: D = 16 900 is not a multiple of 16 (no 128-bit loads on a GPU)
    "sdxl": (4, 128, 128),  # SDXL, 1024 px
    "sd3": (16, 128, 128),  # SD3 / Flux, 1024 px
    "video": (16, 16, 90, 160),  # 16 latent frames of 16×90×160 (720p-class video VAE)
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

COLUMNS = (
    "timestamp", "device", "device_name", "threads", "torch", "triton", "op", "provider", "loss",
    "mode", "shape", "sample_shape", "pairs", "dtype", "target", "ref", "elements", "bytes_moved",
    "ms_median", "ms_p20", "ms_p80", "reps", "cpu_ms_median", "gbps", "pct_copy_bw", "copy_gbps", "launch_us",
    "floor_ms", "x_floor", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_mb", "rel_err_vs_eager",
    "load_avg",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Cases and their inputs
# ----------------------------------------------------------------------------------------------

LossFn = Callable[..., torch.Tensor]  # fn(**inputs) -> scalar loss
BETA = 5000.0  # Diffusion-DPO's published β (the values do not change the work)
ALPHA = 0.01  # DMPO's SD1.5/SDXL α; unused by the DPO kinds



@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration of the pair-loss op."""

    shape: str
    pairs: int
    dtype: str = "fp32"
    target: str = "full"  # "full": (2B, *S); "shared": (B, *S), one target per pair
    ref: str = "ref_pred"  # "ref_pred": (2B, *S) reference prediction; "ref_err": precomputed (2B,)
    loss: str = "sigmoid"  # "sigmoid" | "hinge" | "ipo" (dpo_loss kinds) | "dmpo"
    op = "pair_loss"  # a class constant, not a field

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.target not in ("full", "shared"):
            raise ValueError(f"target must be 'full' or 'shared', got {self.target!r}")
        if self.ref not in ("ref_pred", "ref_err"):
            raise ValueError(f"ref must be 'ref_pred' or 'ref_err', got {self.ref!r}")
        if self.loss not in reference.PAIR_LOSSES:
            raise ValueError(f"loss must be one of {sorted(reference.PAIR_LOSSES)}, got {self.loss!r}")
        if self.pairs < 1:
            raise ValueError(f"pairs must be ≥ 1, got {self.pairs}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return SHAPES[self.shape]

    @property
    def elements(self) -> int:
        """N = 2B·D, the elements of ``model_pred``."""
        return 2 * self.pairs * math.prod(self.sample_shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"{self.shape}×{self.pairs} {self.dtype} target={self.target} {self.ref} {self.loss}"

    def fields(self) -> dict:
        """The CSV columns that describe the case."""
        return {
            "op": self.op, "loss": self.loss, "shape": self.shape,
            "sample_shape": "×".join(map(str, self.sample_shape)), "pairs": self.pairs, "dtype": self.dtype,
            "target": self.target, "ref": self.ref, "elements": self.elements,
        }  # fmt: skip

    def bytes_moved(self, mode: str) -> int:
        """Bytes an ideal implementation must move (see the module docstring)."""
        n_s = self.elements * _itemsize(self.torch_dtype)
        t = 0.5 if self.target == "shared" else 1.0
        r = 1.0 if self.ref == "ref_pred" else 0.0
        return _by_mode(mode, (1.0 + r + t) * n_s, (2.0 + t) * n_s)

    def inputs(self, device: torch.device, seed: int = 0) -> dict:
        """Random inputs shaped like a training step: the reference is a noisy predictor of the target
        and the model a small perturbation of the reference (errors O(1)). Built in place, in the
        case's dtype, so a video-scale case needs no fp64 copy."""
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        n, b, s, dt = 2 * self.pairs, self.pairs, self.sample_shape, self.torch_dtype
        target = torch.randn((b if self.target == "shared" else n, *s), generator=g, dtype=dt, device=device)
        ref_pred = torch.randn((n, *s), generator=g, dtype=dt, device=device)
        ref_pred.view(2, b, *s).add_(target.view(-1, b, *s))  # (2|1, B, *S): full or shared target
        model_pred = torch.randn((n, *s), generator=g, dtype=dt, device=device).mul_(0.3).add_(ref_pred)
        model_pred.requires_grad_(True)
        inputs = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target, "ref_err": None}
        if self.ref == "ref_err":
            inputs["ref_err"] = reference.pair_errors(ref_pred, target)
            inputs["ref_pred"] = None
        return inputs

    def eager(self) -> LossFn:
        """The reference, as diffusers and the Salesforce code compute it (upcast, square, mean over S,
        chunk, margin, ``logsigmoid``)."""
        loss, alpha = self.loss, ALPHA

        def pair_loss_eager(model_pred, ref_pred, target, ref_err):
            return reference.pair_loss_ref(
                loss, model_pred, ref_pred, target, ref_err=ref_err, beta=BETA, alpha=alpha
            )[0]

        return pair_loss_eager

    def fastpref(self, backend: str) -> LossFn:
        if self.loss == "dmpo":
            return functools.partial(_dmpo, beta=BETA, alpha=ALPHA, backend=backend)
        return functools.partial(_dpo, beta=BETA, kind=self.loss, backend=backend)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _by_mode(mode: str, fwd: float, bwd: float) -> int:
    return int({"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode])


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Provider:
    """A way to compute a case's loss: ``build(case)`` returns ``fn(**case.inputs(device))``."""

    name: str
    build: Callable


def _compiled(case) -> LossFn:
    # A fresh dynamo cache per case: static shapes (what a trainer with a fixed resolution gets)
    # without hitting the recompile limit, past which dynamo would silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(case.eager(), dynamic=False)


def _fastpref(backend: str) -> Callable:
    return lambda case: case.fastpref(backend)


def _dpo(model_pred, ref_pred, target, ref_err, **kw):
    return fastpref.dpo_loss(model_pred, ref_pred, target, ref_err=ref_err, **kw)


def _dmpo(model_pred, ref_pred, target, ref_err, **kw):
    return fastpref.dmpo_loss(model_pred, ref_pred, target, ref_err=ref_err, **kw)


EAGER = Provider("torch", lambda case: case.eager())
COMPILE = Provider("torch_compile", _compiled)


def _triton_interpreted() -> bool:
    from fastpref.ops import triton_available

    if not triton_available():
        return False
    from fastpref.ops.pair_loss import interpreter_enabled

    return interpreter_enabled()


def discover_providers(device: torch.device, only: tuple[str, ...] | None = None, interpreted_triton: bool = False):
    """The providers that run on ``device``: ``(providers, skipped)`` where ``skipped`` maps a
    provider name to the reason it is left out. Each fastpref backend is probed with a tiny forward
    and backward; one that raises (an explicitly requested backend that cannot run raises a
    ``ValueError`` saying why, it never falls back) is skipped with that message.
    ``interpreted_triton``: keep the Triton provider on a CPU (its interpreter), for dry runs only."""
    providers, skipped = [EAGER, COMPILE], {}
    probe_case = Case("tiny", 1)
    for backend in losses.BACKENDS:
        if backend in ("auto", "torch"):  # auto is an alias; torch is the eager provider
            continue
        name = f"fastpref-{backend}"
        if only is not None and name not in only:
            continue
        if backend == "triton" and (device.type != "cuda" or _triton_interpreted()) and not interpreted_triton:
            skipped[name] = (
                "Triton runs here only through its CPU interpreter (a correctness tool, ~0.3 ms per op "
                "per program): never timed"
            )
            continue
        fn = probe_case.fastpref(backend)
        inputs = probe_case.inputs(device)
        try:
            fn(**inputs).backward()
        except Exception as exc:  # noqa: BLE001 — any failure means "not available here"; say why
            skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        providers.append(Provider(name, _fastpref(backend)))
    if only is not None:
        providers = [p for p in providers if p.name in only]
    return providers, skipped


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repetition policy: ``warmup`` untimed calls, then repeat until ``budget_s`` of timed work and
    at least ``min_reps`` (at most ``max_reps``) repetitions."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 100
    budget_s: float = 0.3


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device=device)


class _Sync:
    """Per-device timing primitives. On a GPU: CUDA events around the timed call and an L2 flush
    before it (a 256 MB write, as triton.testing.do_bench does), so nothing is timed from cache."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = _flush_buffer(device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_once(self, fn, arg) -> tuple[float, float]:
        """(wall seconds, process CPU seconds — NaN on a GPU) of one call."""
        if self.cuda:
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(arg)
            end.record()
            torch.cuda.synchronize(self.device)
            del out
            return start.elapsed_time(end) / 1e3, math.nan
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(arg)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        del out
        return dt, dc


@dataclasses.dataclass(frozen=True)
class Samples:
    """Per-call times in seconds: ``wall`` (CUDA events on a GPU, ``perf_counter`` on a CPU) and, on a
    CPU, ``cpu``, the CPU time of all the process's threads — unlike wall time it does not count the
    time the benchmark waits for a core that other processes hold."""

    wall: np.ndarray
    cpu: np.ndarray


def measure(fn, device: torch.device, *, setup=None, timing: Timing = Timing()) -> Samples:
    """Times of ``fn(setup())``; ``setup`` runs untimed before every call."""
    s = _Sync(device)
    setup = setup or (lambda: None)
    for _ in range(timing.warmup):
        fn(setup())
        s.sync()
    times, spent = [], 0.0
    while len(times) < timing.max_reps and (len(times) < timing.min_reps or spent < timing.budget_s):
        arg = setup()
        s.sync()
        times.append(s.time_once(fn, arg))
        spent += times[-1][0]
    wall, cpu = zip(*times)
    return Samples(np.asarray(wall), np.asarray(cpu))


def peak_memory(fn, device: torch.device, *, setup=None) -> int:
    """Bytes allocated above what is live before one call of ``fn(setup())`` (its high-water mark).
    CUDA: the caching allocator's peak statistics. CPU: the profiler's record of every allocation
    through c10's CPU allocator (eager ops, compiled kernels and C++ extensions alike)."""
    arg = (setup or (lambda: None))()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(arg)
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(arg)
        del out
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# Device facts, measured in the same run as the benchmarks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    device: str  # "cpu" or "cuda"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (2 threads)"
    threads: int
    torch: str
    triton: str
    copy_gbps: float  # measured dst.copy_(src) bandwidth, read + write
    launch_us: float  # measured time of a one-element op

    def describe(self) -> str:
        return (
            f"{self.name}; torch {self.torch}, triton {self.triton}; measured copy bandwidth "
            f"{self.copy_gbps:.1f} GB/s, one-element op {self.launch_us:.1f} µs"
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model} ({torch.get_num_threads()} threads)"


def load_avg() -> float:
    """1-minute load average of the machine (other processes share a CPU's cores with the benchmark)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def measure_device(device: torch.device, copy_mib: int | None = None) -> DeviceFacts:
    """Copy bandwidth (a buffer far larger than the caches, copied with ``copy_``) and the latency
    of a one-element op, on ``device``, now."""
    if copy_mib is None:
        copy_mib = 1024 if device.type == "cuda" else 256
    src = torch.ones(copy_mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda _: dst.copy_(src), device, timing=Timing(warmup=3, min_reps=10, max_reps=50, budget_s=0.5))
    copy_gbps = 2 * src.numel() * 4 / float(np.median(t.wall)) / 1e9
    del src, dst
    one = torch.zeros(1, device=device)
    t = measure(lambda _: one.add_(1.0), device, timing=Timing(warmup=10, min_reps=200, max_reps=2000, budget_s=0.05))
    return DeviceFacts(
        device=device.type,
        name=device_name(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=_triton_version(),
        copy_gbps=copy_gbps,
        launch_us=float(np.median(t.wall)) * 1e6,
    )


# ----------------------------------------------------------------------------------------------
# One case, every provider, every mode → rows
# ----------------------------------------------------------------------------------------------


def mode_fns(loss_fn: LossFn, inputs: dict, mode: str):
    """``(setup, timed)`` for a mode; the gradient is reset untimed before every repetition."""
    x = inputs["model_pred"]

    def call():
        return loss_fn(**inputs)

    def clear():
        x.grad = None

    if mode == "forward":
        return clear, lambda _: call()
    if mode == "backward":

        def setup():
            clear()
            return call()

        return setup, lambda loss: loss.backward()
    return clear, lambda _: call().backward()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_case(
    case,
    providers,
    device: torch.device,
    facts: DeviceFacts,
    *,
    modes=MODES,
    timing: Timing = Timing(),
    memory: bool = True,
    skipped: dict | None = None,
) -> list[dict]:
    """Time every provider on ``case`` in every mode; returns one CSV row per (provider, mode).

    Each provider's loss and gradient are first compared with the eager reference
    (``rel_err_vs_eager``): a fast wrong answer is not a result. A provider that fails on this case
    (e.g. out of memory) is recorded in ``skipped`` as ``"provider case": reason``.
    """
    inputs = case.inputs(device)
    x = inputs["model_pred"]
    ref_out = None
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for provider in providers:
        try:
            loss_fn = provider.build(case)
            x.grad = None
            loss = loss_fn(**inputs)  # compiles, if it does
            loss.backward()
            out = (loss.detach(), x.grad.detach().clone())
            x.grad = None
            if ref_out is None and provider.name == EAGER.name:
                ref_out = out
            rel = max(_rel_err(out[0], ref_out[0]), _rel_err(out[1], ref_out[1])) if ref_out else float("nan")
            del loss, out
            for mode in modes:
                setup, timed = mode_fns(loss_fn, inputs, mode)
                t = measure(timed, device, setup=setup, timing=timing)
                peak = peak_memory(timed, device, setup=setup) if memory else float("nan")
                rows.append(_row(stamp, facts, provider.name, case, mode, t, peak, rel))
        except Exception as exc:  # noqa: BLE001 — e.g. out of memory, or a backend without this op
            if skipped is None:
                raise
            skipped[f"{provider.name} {case.label()}"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        finally:
            x.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _fill_speedups(rows)
    return rows


def _row(stamp, facts: DeviceFacts, provider: str, case, mode: str, t: Samples, peak, rel) -> dict:
    med, p20, p80 = (float(v) for v in np.quantile(t.wall, [0.5, 0.2, 0.8]))
    nbytes = case.bytes_moved(mode)
    gbps = nbytes / med / 1e9
    # the floor: at least one launch, at least the bytes at copy bandwidth
    floor = max(facts.launch_us * 1e-6, nbytes / (facts.copy_gbps * 1e9))
    return {
        "timestamp": stamp,
        "device": facts.device,
        "device_name": facts.name,
        "threads": facts.threads,
        "torch": facts.torch,
        "triton": facts.triton,
        "provider": provider,
        "mode": mode,
        **case.fields(),
        "bytes_moved": nbytes,
        "ms_median": med * 1e3,
        "ms_p20": p20 * 1e3,
        "ms_p80": p80 * 1e3,
        "reps": len(t.wall),
        "cpu_ms_median": float(np.median(t.cpu)) * 1e3,
        "gbps": gbps,
        "pct_copy_bw": 100.0 * gbps / facts.copy_gbps,
        "copy_gbps": facts.copy_gbps,
        "launch_us": facts.launch_us,
        "floor_ms": floor * 1e3,
        "x_floor": med / floor,
        "speedup_vs_eager": float("nan"),
        "speedup_vs_compile": float("nan"),
        "peak_mem_mb": peak / 2**20,
        "rel_err_vs_eager": rel,
        "load_avg": load_avg(),
    }


def _fill_speedups(rows: list[dict]) -> None:
    """speed-up = baseline median / this median, per (case, mode), when the baseline ran."""
    base = {(r["mode"], r["provider"]): r["ms_median"] for r in rows}
    for r in rows:
        for col, prov in (("speedup_vs_eager", EAGER.name), ("speedup_vs_compile", COMPILE.name)):
            if (r["mode"], prov) in base:
                r[col] = base[(r["mode"], prov)] / r["ms_median"]
