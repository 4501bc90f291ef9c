"""Compile Triton kernels ahead of time for a GPU target, on a machine with no GPU.

Run as a script with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit functions, so this
cannot run in the test process). Catches what the interpreter never sees: type errors in loop-carried
values, unsupported ops, register/shared-memory overflow at the block sizes the launchers pick.
Usage: python tests/_aot_compile.py  → prints one line per kernel variant, exits non-zero on failure.
"""

import itertools
import sys
from pathlib import Path

# compile this checkout's kernels, not those of whatever fastpref the venv has installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200 (sm_90)


# Scalar arguments that are floats; every other non-constexpr scalar is an integer (strides i64).
FLOAT_SCALARS = {"inv_D", "beta", "c0", "c1", "scale", "coef", "tau", "inv_tau", "half_beta", "margin", "alpha"}
# Pointers that carry the input dtype; every other pointer is fp32.
DATA_POINTERS = {"model_ptr", "ref_ptr", "target_ptr", "grad_ptr"}


def signature_of(fn, dtype):
    """Triton signature from the kernel's own parameter list, so a kernel that gains an argument
    needs no edit here: ``*_ptr`` are pointers, names in FLOAT_SCALARS fp32, strides i64, the rest i32."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = f"*{dtype}" if p.name in DATA_POINTERS else "*fp32"
        elif p.name in FLOAT_SCALARS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i64" if p.name.startswith("stride") else "i32"
    return sig


def compile_variant(fn, dtype, constexprs, num_warps):
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    constexprs = {**constexprs, **{name: False for name in missing}}  # new flags default off
    src = ASTSource(fn=fn, signature=signature_of(fn, dtype), constexprs=constexprs)
    triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def pair_loss_variants():
    from fastpref.ops import pair_loss as P

    for dtype, has_ref, shared in [("bf16", True, True), ("fp16", True, False), ("fp32", False, False),
                                   ("fp32", True, True)]:  # fmt: skip
        yield (f"fwd {dtype} ref={has_ref} shared={shared}", P._pair_err_fwd_kernel, dtype,
               {"SPLITS": 8, "HAS_REF": has_ref, "SHARED_TARGET": shared, "BLOCK": 2048}, 8)  # fmt: skip
    for name, loss in P.LOSS_IDS.items():
        for has_ref in (True, False):
            yield (f"finalize {name} ref={has_ref}", P._pair_loss_finalize_kernel, "fp32",
                   {"LOSS": loss, "HAS_REF": has_ref, "SPLITS": 8, "SPLITS_P2": 8, "BLOCK_B": 512}, 4)  # fmt: skip
    for dtype, per_pair, shared, unpaired in [("bf16", False, True, False), ("fp32", True, False, False),
                                              ("fp16", True, False, True), ("bf16", False, True, True)]:  # fmt: skip
        yield (f"bwd {dtype} per_pair={per_pair} shared={shared} unpaired={unpaired}", P._pair_err_bwd_kernel, dtype,
               {"GRAD_PER_PAIR": per_pair, "SHARED_TARGET": shared, "UNPAIRED": unpaired, "BLOCK": 2048}, 8)  # fmt: skip


def rpo_variants():
    from fastpref.ops import pair_loss as P
    from fastpref.ops import rpo as R

    for kind in R.RPO_KINDS:
        for from_emb in (True, False):
            for inside in (False, True):
                meta = {"LOSS": P.LOSS_IDS[kind], "FROM_EMB": from_emb, "WEIGHT_INSIDE": inside,
                        "BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_K": 64}  # fmt: skip
                for name, fn in (("rows fwd", R._rpo_rows_fwd_kernel), ("cols bwd", R._rpo_cols_bwd_kernel)):
                    yield f"rpo {name} {kind} emb={from_emb} inside={inside}", fn, "fp32", meta, 4


#: every kernel family adds its generator of (name, fn, pointer dtype, constexprs, num_warps) here
VARIANTS = [pair_loss_variants, rpo_variants]


def main() -> int:
    failures = 0
    for gen in VARIANTS:
        for name, fn, dtype, constexprs, num_warps in gen():
            try:
                compile_variant(fn, dtype, constexprs, num_warps)
                print(f"ok   {name}")
            except Exception as exc:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
