"""The pair-loss kernel family's shared constants: loss ids, per-loss kernel scalars, which backend
implements which loss. Imports only torch-free Python, so every backend — and a machine without
triton — can read them.

Every fused kernel (Triton, C++, CUDA) takes the same three scalars ``beta, c0, c1`` per loss;
:func:`kernel_scalars` is the one place that maps a loss's named parameters onto them.
"""

from __future__ import annotations

import math
import os

__all__ = [
    "LOSS_IDS",
    "REF_FREE_LOSSES",
    "UNPAIRED_LOSSES",
    "CPP_LOSSES",
    "REDUCTION_IDS",
    "kernel_scalars",
    "interpreter_enabled",
]

#: constexpr ids of the losses of the fused kernel family (one kernel, many losses). The single source
#: of truth: the Triton kernels (``fastpref/ops/pair_loss.py``) and the C++/CUDA kernels
#: (``csrc/pair_loss.h``: ``LossId``) use these numbers. Ids 0–4 are functions of d = Δθ − Δref;
#: 5 and 6 are reference-free (functions of e_θ[w], e_θ[l]); 7 is unpaired (one loss per row).
LOSS_IDS = {"sigmoid": 0, "hinge": 1, "ipo": 2, "dmpo": 3, "dro": 4, "mapo": 5, "orpo": 6, "kto": 7}
#: losses without a reference model (e_ref reads as 0)
REF_FREE_LOSSES = ("mapo", "orpo")
#: losses over unpaired rows (any N, "mean" over rows)
UNPAIRED_LOSSES = ("kto",)
#: the losses the C++/CUDA extension (``csrc/``) implements: ids 0–6 (kto's unpaired rows and the
#: RPO weight matrix run on Triton or the reference)
CPP_LOSSES = ("sigmoid", "hinge", "ipo", "dmpo", "dro", "mapo", "orpo")
#: the ``reduction`` int of the C++ op schema (``csrc/pair_loss.h``: ``Reduction``)
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}


def kernel_scalars(loss: str, **p: float) -> tuple[float, float, float]:
    """``(beta, c0, c1)``: what the kernels' three scalars mean for each loss (u = −½·β·d for ids 0–4).

    ==========  ====================  ===================  ===================
    loss        beta                  c0                   c1
    ==========  ====================  ===================  ===================
    sigmoid     β                     –                    –
    hinge       β                     –                    –
    ipo         β                     1/(2β)               –
    dmpo        β                     log(1 − α)           log α
    dro         2 (so u = −d)         margin m             –
    mapo        β_M                   snr_value s          num_train_timesteps T
    orpo        β (log p = −½βe)      λ                    –
    kto         β                     λ_desirable          λ_undesirable
    ==========  ====================  ===================  ===================
    """
    if loss in ("sigmoid", "hinge"):
        return float(p["beta"]), 0.0, 0.0
    if loss == "ipo":
        return float(p["beta"]), 1.0 / (2.0 * p["beta"]), 0.0
    if loss == "dmpo":
        return float(p["beta"]), math.log1p(-p["alpha"]), math.log(p["alpha"])
    if loss == "dro":
        return 2.0, float(p["margin"]), 0.0
    if loss == "mapo":
        return float(p["beta"]), float(p["snr_value"]), float(p["num_train_timesteps"])
    if loss == "orpo":
        return float(p["beta"]), float(p["lambda_orpo"]), 0.0
    if loss == "kto":
        return float(p["beta"]), float(p["lambda_desirable"]), float(p["lambda_undesirable"])
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSS_IDS)}")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
