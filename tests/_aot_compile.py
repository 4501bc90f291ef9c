"""Compile every Triton kernel variant for A100 (sm_80) and H100/H200 (sm_90) on a machine with no GPU,
with the specialisation the JIT applies at run time, and inspect the machine code.

Run as a script with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit functions, so this cannot
run in the test process); ``tests/test_kernels_compile_for_gpu.py`` runs it and checks its report.

How the launches are obtained: the real launchers (``pair_loss_forward``/``pair_loss_backward``,
``PairErrors``, ``RPORows``) run on CPU tensors of real latent shapes with their GPU launch
configuration (``launch_config`` as on a device with the target's SM count) while the kernels are
replaced by recorders. Each recorded launch is specialised exactly as ``JITFunction.run`` would
specialise it (Triton's own ``specialize_impl``: ``tt.divisibility`` 16 on 16-byte-aligned pointers and
on integers that are multiples of 16, integers equal to 1 folded into constants) and compiled with
``triton.compile`` — Triton's LLVM and its bundled ptxas — for each target. Nothing is hand-written
about the signature, so a launcher that starts passing an unaligned stride shows up here.

What is checked (``--json`` prints one record per (target, kernel variant)):

* zero register spills (ptxas's spill stores and loads) for every variant;
* the streaming kernels (pair forward / backward) read every streamed tensor with 128-bit loads
  (``ld.global.v4.b32``) and write the gradient with 128-bit stores when D is a multiple of 16;
* they keep the occupancy the launcher is designed for: ``launch_config`` aims at 4 programs of 8 warps
  per SM (32 of 64 warp slots, with enough loads in flight to cover HBM latency), so the registers per
  thread must leave room for 4 resident programs: ≤ 64 at 256 threads (65 536 registers per SM).
* for a sample size D that is not a multiple of 16 (e.g. a 4×65×65 latent) the same kernels are
  compiled and reported (they lose the vector loads; the report says how many loads they issue).

Usage: ``python tests/_aot_compile.py [--json] [--targets sm_80,sm_90]``; exits non-zero on a failed
compile or check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

# compile this checkout's kernels, not those of whatever fastpref the venv has installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

#: name → (compile target, SM count the launcher sizes its grid for)
TARGETS = {
    "sm_80": (GPUTarget("cuda", 80, 32), 108),  # A100
    "sm_90": (GPUTarget("cuda", 90, 32), 132),  # H100 / H200 SXM
}
REGS_PER_SM = 65536  # sm_80 and sm_90
MAX_THREADS_PER_SM = 2048
MAX_PROGRAMS_PER_SM = 32
#: the launcher's design point: programs of the streaming kernels resident per SM
DESIGN_PROGRAMS_PER_SM = 4
STREAMING = ("_pair_err_fwd_kernel", "_pair_err_bwd_kernel")

#: latent shapes of the launches: SD1.5's 4×64×64 (D a multiple of 16, as every common resolution),
#: and 4×65×65 (a 520-px image: D = 16 900, not a multiple of 16)
ALIGNED_SHAPE = (4, 64, 64)
ODD_SHAPE = (4, 65, 65)
PAIRS = 4  # B = 4: no argument equals 1 (the JIT would fold it into a constant)


# ----------------------------------------------------------------------------------------------
# Launch capture
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    case: str  # what produced it


class _Recorder:
    """Stands in for a JITFunction in its module: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, log, case):
        self.fn, self.log, self.case = fn, log, case

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.fn, args, kwargs, self.case[0]))


@contextlib.contextmanager
def recording(sm_count: int, log: list, case: list):
    """Kernels replaced by recorders; the launchers' configuration that of a GPU with ``sm_count`` SMs."""
    from fastpref.ops import pair_loss as P
    from fastpref.ops import rpo as R

    cuda = torch.device("cuda", 0)  # a device object only: nothing is queried or allocated on it
    launch_config, rpo_launch_config = P.launch_config, R.rpo_launch_config
    patches = [
        (P, "_sm_count", lambda index: sm_count),
        (P, "launch_config", lambda pairs, numel, device, *a, **kw: launch_config(pairs, numel, cuda, *a, **kw)),
        (R, "rpo_launch_config", lambda m, n, k, device: rpo_launch_config(m, n, k, cuda)),
    ]
    for mod, name in [(P, "_pair_err_fwd_kernel"), (P, "_pair_loss_finalize_kernel"), (P, "_pair_err_bwd_kernel"),
                      (R, "_rpo_rows_fwd_kernel"), (R, "_rpo_cols_bwd_kernel")]:  # fmt: skip
        patches.append((mod, name, _Recorder(getattr(mod, name), log, case)))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: every loss's parameters, for :func:`fastpref.ops.family.kernel_scalars` (values do not change the code)
SCALARS = dict(beta=1.0, alpha=0.5, margin=1e-3, snr_value=0.5, num_train_timesteps=1000.0, lambda_orpo=0.1,
               lambda_desirable=1.0, lambda_undesirable=1.0)


def pair_launches(sample_shape, dtypes=tuple(DTYPES), losses=None, reductions=("mean", "none"), log=None, case=None):
    """Run the pair-loss launchers (forward and backward, every loss × dtype × target form × ref form ×
    reduction) on CPU tensors; the recorders collect the kernel launches."""
    from fastpref.ops import pair_loss as P
    from fastpref.ops.family import kernel_scalars

    losses = losses or tuple(P.LOSS_IDS)
    b = PAIRS
    n = 2 * b
    for dtype_name in dtypes:
        dt = DTYPES[dtype_name]
        for shared in (False, True):
            model = torch.zeros((n, *sample_shape), dtype=dt)
            target = torch.zeros(((b if shared else n), *sample_shape), dtype=dt)
            for loss in losses:
                unpaired = loss in P.UNPAIRED_LOSSES
                ref_forms = ("none",) if loss in P.REF_FREE_LOSSES else ("ref_pred", "ref_err")
                for ref in ref_forms:
                    ref_pred = torch.zeros_like(model) if ref == "ref_pred" else None
                    ref_err = torch.zeros(n) if ref == "ref_err" else None
                    labels = torch.ones(n) if unpaired else None
                    for reduction in reductions:
                        case[0] = f"{loss} {dtype_name} target={'shared' if shared else 'full'} {ref} {reduction}"
                        beta, c0, c1 = kernel_scalars(loss, **SCALARS)
                        out, _, _, dl_de = P.pair_loss_forward(model, ref_pred, target, ref_err, labels, loss, beta,
                                                               c0, c1, reduction)  # fmt: skip
                        grad_out = torch.ones(out.shape)
                        P.pair_loss_backward(grad_out, model, target, dl_de, loss, reduction)
            if len(reductions) == 1:
                continue
            case[0] = f"pair_errors {dtype_name} target={'shared' if shared else 'full'}"
            e, _ = P.PairErrors.apply(model.requires_grad_(True), None, target, None)
            e.sum().backward()


def rpo_launches(log=None, case=None):
    """RPO's row / column kernels: both kinds, from embeddings or given weights, weights in or out."""
    from fastpref.ops import rpo as R

    m, k = 64, 768  # per-rank winners; an open_clip ViT-L/14 embedding width
    for kind in R.RPO_KINDS:
        for from_emb in (True, False):
            for inside in (False, True):
                case[0] = f"rpo {kind} {'embeddings' if from_emb else 'weights'} inside={inside}"
                mw, ml = torch.zeros(m, requires_grad=True), torch.zeros(m, requires_grad=True)
                rw, rl = torch.zeros(m), torch.zeros(m)
                emb = (torch.randn(m, k), torch.randn(m, k)) if from_emb else (None, None)
                weights = None if from_emb else torch.rand(m, m)
                rows = R.fused_rpo_rows(kind, mw, ml, rw, rl, weights, *emb, tau=0.01, beta=1.0, weight_inside=inside)
                rows.sum().backward()


# ----------------------------------------------------------------------------------------------
# Specialise as the JIT does, compile, inspect
# ----------------------------------------------------------------------------------------------


def specialise(launch: Launch):
    """``(signature, constexprs, attrs, num_warps)`` of a launch, as ``JITFunction.run`` builds them."""
    from triton._C.libtriton import native_specialize_impl

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    values = list(launch.args) + [kwargs[p.name] for p in fn.params[len(launch.args) :]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, values)):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        kind, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize, True)
        signature[p.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[(i,)] = v
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, num_warps


def _key(launch: Launch) -> str:
    sig, constexprs, attrs, warps = specialise(launch)
    return json.dumps([launch.fn.__name__, sig, sorted((k, str(v)) for k, v in constexprs.items()),
                       sorted((k, str(v)) for k, v in attrs.items()), warps])  # fmt: skip


def ptxas_usage(log: str) -> dict:
    """Registers, spill stores/loads and stack frame from ptxas's ``-v`` report (Triton runs ptxas with
    ``-v``; ``knobs.nvidia.dump_ptxas_log`` prints the report)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise RuntimeError(f"no ptxas report in: {log[-500:]!r}")
    return {"regs": int(regs.group(1)), "stack_bytes": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3))}  # fmt: skip


def _global_accesses(ptx: str, op: str) -> dict:
    """Counts of ``ld.global``/``st.global`` by width in bits (vector width × element bits)."""
    counts: dict = {}
    for m in re.finditer(rf"\b{op}\.global(?:\.[a-zA-Z0-9_:]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b", ptx):
        bits = int(m.group(1) or 1) * int(m.group(3))
        counts[bits] = counts.get(bits, 0) + 1
    return counts


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Resident programs per SM on sm_80/sm_90: registers are allocated per warp in units of 256."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps) if regs else MAX_PROGRAMS_PER_SM
    by_smem = (227 * 1024) // shared if shared else MAX_PROGRAMS_PER_SM  # both have ≥ 164 KiB; 227 KiB on sm_90
    return min(by_regs, MAX_THREADS_PER_SM // (32 * warps), by_smem, MAX_PROGRAMS_PER_SM)


def streamed_tensors(name: str, constexprs: dict, fn) -> tuple[int, int]:
    """(tensors read, tensors written) per iteration of a streaming kernel's loop."""
    c = {fn.params[k[0]].name: v for k, v in constexprs.items()}
    targets = 1 if c.get("SHARED_TARGET") else 2
    if name == "_pair_err_fwd_kernel":
        return 2 + targets + (2 if c.get("HAS_REF") else 0), 0
    return 2 + targets, 2


def inspect(launch: Launch, target_name: str, aligned: bool) -> dict:
    target, _ = TARGETS[target_name]
    sig, constexprs, attrs, warps = specialise(launch)
    src = ASTSource(fn=launch.fn, signature=sig, constexprs=constexprs, attrs=attrs)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    use = ptxas_usage(report.getvalue())
    shared = compiled.metadata.shared
    name = launch.fn.__name__
    c = {launch.fn.params[k[0]].name: v for k, v in constexprs.items()}
    rec = {
        "target": target_name, "kernel": name, "case": launch.case, "aligned": aligned, "num_warps": warps,
        "constexprs": {k: v for k, v in c.items() if k != "SPLITS"},
        # the kernel variant, apart from sizes: the flags and the streamed dtype
        "variant": sorted([k, str(v)] for k, v in c.items() if not k.startswith(("SPLITS", "BLOCK")))
        + [["dtype", sig.get("model_ptr", "")]],
        "divisible_by_16": sorted(launch.fn.params[k[0]].name for k in attrs),
        **use, "shared_bytes": shared,
        "loads_by_bits": _global_accesses(ptx, "ld"), "stores_by_bits": _global_accesses(ptx, "st"),
        "programs_per_sm": programs_per_sm(use["regs"], warps, shared),
        "checks": [],
    }  # fmt: skip
    checks = rec["checks"]
    if use["spill_stores"] or use["spill_loads"]:
        checks.append(f"spills: {use['spill_stores']} B spill stores, {use['spill_loads']} B spill loads")
    if name in STREAMING:
        reads, writes = streamed_tensors(name, constexprs, launch.fn)
        block = c["BLOCK"]
        bytes_per_thread = block // (32 * warps) * DTYPES_BITS[sig["model_ptr"]] // 8
        rec["streamed"] = {"reads": reads, "writes": writes, "bytes_per_thread_per_tensor": bytes_per_thread}
        if aligned:
            want = reads * bytes_per_thread // 16
            wide = rec["loads_by_bits"].get(128, 0)
            narrow = sum(v for bits, v in rec["loads_by_bits"].items() if bits != 128)
            # the backward's scalar loads: the upstream gradient(s) and ∂ℓ/∂e_θ of the two rows
            allowed_narrow = 0 if name == "_pair_err_fwd_kernel" else 4
            if wide != want or narrow > allowed_narrow:
                checks.append(f"loads: want {want} 128-bit loads (and ≤ {allowed_narrow} scalar), got {rec['loads_by_bits']}")
            if writes:
                want_st = writes * bytes_per_thread // 16
                if rec["stores_by_bits"].get(128, 0) != want_st or len(rec["stores_by_bits"]) != 1:
                    checks.append(f"stores: want {want_st} 128-bit stores, got {rec['stores_by_bits']}")
            if rec["programs_per_sm"] < DESIGN_PROGRAMS_PER_SM:
                checks.append(f"occupancy: {use['regs']} registers × {warps} warps leave "
                              f"{rec['programs_per_sm']} programs per SM, designed for {DESIGN_PROGRAMS_PER_SM}")  # fmt: skip
    return rec


DTYPES_BITS = {"*fp32": 32, "*bf16": 16, "*fp16": 16}


def collect(target_name: str):
    """Unique launches for one target: ``[(launch, aligned)]``."""
    _, sm_count = TARGETS[target_name]
    log, case = [], [""]
    out = {}
    with recording(sm_count, log, case):
        pair_launches(ALIGNED_SHAPE, log=log, case=case)
        rpo_launches(log=log, case=case)
        aligned = list(log)
        log.clear()
        pair_launches(ODD_SHAPE, dtypes=("fp32", "bf16"), losses=("sigmoid",), reductions=("mean",), log=log, case=case)
        odd = [x for x in log if x.fn.__name__ in STREAMING]
    for launch, is_aligned in [(x, True) for x in aligned] + [(x, False) for x in odd]:
        out.setdefault(_key(launch), (launch, is_aligned))
    return list(out.values())


def main(argv=None) -> int:
    import tempfile

    from triton import knobs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument("--targets", default=",".join(TARGETS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastpref-aot-") as cache:
        # a fresh kernel cache: every variant is compiled, and ptxas reports on it, in this run
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True
        return _run(args)


def _run(args) -> int:
    failures = 0
    for target_name in args.targets.split(","):
        for launch, aligned in collect(target_name):
            try:
                rec = inspect(launch, target_name, aligned)
            except Exception as exc:  # report every failing variant, not just the first
                rec = {"target": target_name, "kernel": launch.fn.__name__, "case": launch.case, "aligned": aligned,
                       "checks": [f"compile: {type(exc).__name__}: {str(exc)[:2000]}"]}  # fmt: skip
            failures += bool(rec["checks"])
            if args.json:
                print(json.dumps(rec, default=str), flush=True)
            else:
                status = "FAIL" if rec["checks"] else "ok  "
                extra = "" if "regs" not in rec else (
                    f" regs={rec['regs']} spills={rec['spill_stores']} programs/SM={rec['programs_per_sm']} "
                    f"ld={rec['loads_by_bits']} st={rec['stores_by_bits']}")  # fmt: skip
                print(f"{status} {target_name} {rec['kernel']} [{rec['case']}{'' if aligned else ', D % 16 != 0'}]"
                      f"{extra} {'; '.join(rec['checks'])}", flush=True)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
