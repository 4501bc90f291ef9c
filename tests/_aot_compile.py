"""Compile Triton kernels ahead of time for a GPU target, on a machine with no GPU.

Run as a script with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit functions, so this
cannot run in the test process). Catches what the interpreter never sees: type errors in loop-carried
values, unsupported ops, register/shared-memory overflow at the block sizes the launchers pick.
Usage: python tests/_aot_compile.py  → prints one line per kernel variant, exits non-zero on failure.
"""

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200 (sm_90); the lent GPU machines


def compile_variant(fn, signature, constexprs, num_warps):
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                            options={"num_warps": num_warps})  # fmt: skip
    return kernel.n_regs if hasattr(kernel, "n_regs") else None


def pair_loss_variants():
    from fastpref.ops import pair_loss as P

    ints = {"B": "i32", "D": "i32", "CHUNK": "i32"}
    for dtype, has_ref, shared in [("bf16", True, True), ("fp16", True, False), ("fp32", False, False),
                                   ("fp32", True, True)]:  # fmt: skip
        sig = {"model_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", "partial_ptr": "*fp32",
               **ints, "stride_m": "i64", "stride_r": "i64", "stride_t": "i64"}  # fmt: skip
        yield (f"fwd {dtype} ref={has_ref} shared={shared}", P._pair_err_fwd_kernel, sig,
               {"SPLITS": 8, "HAS_REF": has_ref, "SHARED_TARGET": shared, "BLOCK": 2048}, 8)  # fmt: skip
    for loss, has_ref in itertools.product(P.LOSS_IDS.values(), (True, False)):
        sig = {"partial_ptr": "*fp32", "ref_err_ptr": "*fp32", "err_ptr": "*fp32", "u_ptr": "*fp32",
               "loss_ptr": "*fp32", "dl_de_ptr": "*fp32", "total_ptr": "*fp32", "B": "i32", "inv_D": "fp32",
               "beta": "fp32", "c0": "fp32", "c1": "fp32", "scale": "fp32"}  # fmt: skip
        yield (f"finalize loss={loss} ref={has_ref}", P._pair_loss_finalize_kernel, sig,
               {"LOSS": loss, "HAS_REF": has_ref, "SPLITS": 8, "SPLITS_P2": 8, "BLOCK_B": 512}, 4)  # fmt: skip
    for dtype, per_pair, shared in [("bf16", False, True), ("fp32", True, False)]:
        sig = {"model_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "dl_de_ptr": "*fp32",
               "grad_out_ptr": "*fp32", **ints, "stride_m": "i64", "stride_t": "i64", "coef": "fp32"}  # fmt: skip
        yield (f"bwd {dtype} per_pair={per_pair} shared={shared}", P._pair_err_bwd_kernel, sig,
               {"GRAD_PER_PAIR": per_pair, "SHARED_TARGET": shared, "BLOCK": 2048}, 8)  # fmt: skip


#: every kernel family adds its generator of (name, fn, signature, constexprs, num_warps) here
VARIANTS = [pair_loss_variants]


def main() -> int:
    failures = 0
    for gen in VARIANTS:
        for name, fn, sig, constexprs, num_warps in gen():
            try:
                compile_variant(fn, sig, constexprs, num_warps)
                print(f"ok   {name}")
            except Exception as exc:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
