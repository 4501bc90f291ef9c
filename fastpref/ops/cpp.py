"""The C++ (CPU) and CUDA backends of the pair-loss kernel family: one call into
``torch.ops.fastpref.pair_loss_fwd`` (built from ``csrc/`` by :mod:`fastpref.ops.extension`,
autograd and fake implementation in :mod:`fastpref.ops.library`).

Same math, loss ids and per-loss scalars as the Triton family (:mod:`fastpref.ops.family`): one
pass over ``model_pred``/``ref_pred``/``target`` with fp32 accumulation (fp64 for fp64 input), the
backward re-reads ``model_pred`` and ``target``. Mixed input dtypes (say a bf16 ``model_pred`` and
an fp32 ``target``) are promoted, with one copy, to the reference's compute dtype first.
"""

from __future__ import annotations

import torch

from fastpref.ops.family import CPP_LOSSES, LOSS_IDS, REDUCTION_IDS
from fastpref.reference import compute_dtype

__all__ = ["REDUCTION_IDS", "CPP_LOSSES", "cpp_pair_loss"]


def cpp_pair_loss(loss, model_pred, ref_pred, target, ref_err, *, beta, c0, c1, reduction):
    """Run the C++/CUDA op on validated inputs; returns ``(loss, margin, errors)`` like
    :func:`fastpref.ops.library.triton_pair_loss` (errors: ``(2, 2B)`` = e_θ, e_ref; e_ref = 0 for
    the reference-free losses). ``beta, c0, c1``: :func:`fastpref.ops.family.kernel_scalars`."""
    if target.dtype != model_pred.dtype or (ref_pred is not None and ref_pred.dtype != model_pred.dtype):
        dt = compute_dtype(model_pred, ref_pred, target)
        model_pred, target = model_pred.to(dt), target.to(dt)
        ref_pred = None if ref_pred is None else ref_pred.to(dt)
    if ref_pred is None and ref_err is None:  # reference-free (mapo, orpo): e_ref reads as 0
        ref_err = model_pred.new_zeros(model_pred.shape[0], dtype=torch.float32)
    if ref_err is not None:
        ref_err = ref_err.contiguous()
    out, margin, errors, _dl_de = torch.ops.fastpref.pair_loss_fwd(
        model_pred, ref_pred, target, ref_err, LOSS_IDS[loss], float(beta), float(c0), float(c1),
        REDUCTION_IDS[reduction],
    )
    return out, margin, errors
