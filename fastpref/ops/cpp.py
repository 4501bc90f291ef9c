"""The C++ (CPU) and CUDA backends of the pair-loss kernel family: one call into
``torch.ops.fastpref.pair_loss_fwd`` (built from ``csrc/`` by :mod:`fastpref.ops.extension`,
autograd and fake implementation in :mod:`fastpref.ops.library`).

Same math, loss ids and per-loss constants as the Triton family (:mod:`fastpref.ops.pair_loss`):
one pass over ``model_pred``/``ref_pred``/``target`` with fp32 accumulation (fp64 for fp64 input),
the backward re-reads ``model_pred`` and ``target``. Mixed input dtypes (say a bf16 ``model_pred``
and an fp32 ``target``) are promoted, with one copy, to the reference's compute dtype first.
"""

from __future__ import annotations

import torch

from fastpref.ops.pair_loss import LOSS_IDS, _loss_constants
from fastpref.reference import compute_dtype

__all__ = ["REDUCTION_IDS", "CPP_LOSSES", "cpp_pair_loss"]

#: the ``reduction`` int of the op schema (csrc/pair_loss.h: Reduction)
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}
#: the losses csrc implements (ids 0–6); kto's unpaired rows run on Triton or the reference
CPP_LOSSES = ("sigmoid", "hinge", "ipo", "dmpo", "dro", "mapo", "orpo")


def cpp_pair_loss(loss, model_pred, ref_pred, target, ref_err, *, beta, reduction, alpha=0.5, c0=None, c1=None):
    """Run the C++/CUDA op on validated inputs; returns ``(loss, margin, errors)`` like
    :func:`fastpref.ops.pair_loss.fused_pair_loss` (errors: ``(2, 2B)`` = e_θ, e_ref; e_ref = 0 for
    the reference-free losses). ``c0``/``c1`` override the per-loss constants as there."""
    tensors = [t for t in (model_pred, ref_pred, target) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        dt = compute_dtype(*tensors)
        model_pred, target = model_pred.to(dt), target.to(dt)
        ref_pred = None if ref_pred is None else ref_pred.to(dt)
    if ref_pred is None and ref_err is None:  # reference-free (mapo, orpo): e_ref reads as 0
        ref_err = model_pred.new_zeros(model_pred.shape[0], dtype=torch.float32)
    if c0 is None:
        c0, c1 = _loss_constants(loss, beta, alpha)
    out, margin, errors, _dl_de = torch.ops.fastpref.pair_loss_fwd(
        model_pred, ref_pred, target, ref_err, LOSS_IDS[loss], float(beta), float(c0), float(c1 or 0.0),
        REDUCTION_IDS[reduction],
    )
    return out, margin, errors
