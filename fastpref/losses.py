"""Public loss functions: validation, backend choice, one call into an op.

Each function takes the stacked model prediction ``(2B, *S)`` — winners first, then losers, the
layout of the diffusers and Salesforce trainers — the reference prediction (or precomputed
``ref_err``) and the target, and returns the loss (and, with ``return_stats=True``, a
:class:`~fastpref.stats.PreferenceStats`). Formulas: :mod:`fastpref.reference`.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastpref import reference
from fastpref.stats import PreferenceStats, preference_stats

__all__ = ["dpo_loss", "dmpo_loss", "BACKENDS"]

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
REDUCTIONS = ("mean", "sum", "none")
DPO_KINDS = ("sigmoid", "hinge", "ipo")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Validation: one clear error naming the argument, before anything reaches a kernel.
# ----------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def check_pair_inputs(model_pred, ref_pred, target, ref_err, *, need_ref: bool = True) -> int:
    """Validate the stacked-pair inputs; returns B, the number of pairs."""
    _check_float_tensor("model_pred", model_pred)
    if model_pred.dim() < 1 or model_pred.shape[0] < 2 or model_pred.shape[0] % 2:
        raise ValueError(
            "model_pred must have an even leading dimension 2B ≥ 2 (winners stacked first, then "
            f"losers: torch.cat([pred_w, pred_l])), got shape {tuple(model_pred.shape)}"
        )
    n = model_pred.shape[0]
    b = n // 2
    if model_pred[0].numel() == 0:
        raise ValueError(f"model_pred has no elements per sample, shape {tuple(model_pred.shape)}")
    sample_shape = model_pred.shape[1:]
    device = model_pred.device

    if target is None:
        raise TypeError("target is required (the noise ε, the velocity, or noise − x0 for flow matching)")
    _check_float_tensor("target", target)
    if target.shape[1:] != sample_shape or target.shape[0] not in (n, b):
        raise ValueError(
            f"target must have shape {(n, *sample_shape)} or, shared by each pair, {(b, *sample_shape)}; "
            f"got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but model_pred is on {device}")
    if target.requires_grad:
        raise ValueError("target must not require grad (no gradient is computed for it): pass target.detach()")

    if need_ref:
        if (ref_pred is None) == (ref_err is None):
            raise TypeError("pass exactly one of ref_pred (the frozen reference's prediction) or ref_err")
        if ref_pred is not None:
            _check_float_tensor("ref_pred", ref_pred)
            if ref_pred.shape != model_pred.shape:
                raise ValueError(
                    f"ref_pred must have model_pred's shape {tuple(model_pred.shape)}, got {tuple(ref_pred.shape)}"
                )
            if ref_pred.device != device:
                raise ValueError(f"ref_pred is on {ref_pred.device} but model_pred is on {device}")
            if ref_pred.requires_grad:
                raise ValueError(
                    "ref_pred must not require grad: the reference is frozen — compute it under "
                    "torch.no_grad() or pass ref_pred.detach()"
                )
        else:
            _check_float_tensor("ref_err", ref_err)
            if ref_err.shape != (n,):
                raise ValueError(f"ref_err must have shape ({n},) (one error per sample), got {tuple(ref_err.shape)}")
            if ref_err.device != device:
                raise ValueError(f"ref_err is on {ref_err.device} but model_pred is on {device}")
            if ref_err.requires_grad:
                raise ValueError("ref_err must not require grad: pass ref_err.detach()")
    return b


def resolve_backend(backend: str, device: torch.device) -> str:
    """Which implementation runs: ``"triton"``, ``"cpu"``/``"cuda"`` (the C++/CUDA extension in
    ``csrc/``) or ``"torch"`` (the reference).

    ``"auto"`` → Triton on a CUDA device (or on any device under ``TRITON_INTERPRET=1``, which asks
    for the interpreter explicitly, as the tests do); else the C++ extension on a CPU (or CUDA)
    tensor when it builds (first use builds it, cached; a failed build warns once); else the
    reference. ``"triton"`` on a CPU tensor needs the interpreter; ``"cpu"``/``"cuda"`` need the
    extension and a tensor on that device."""
    from fastpref.ops import extension, triton_available

    _check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} runs on {backend} tensors, but model_pred is on {device}")
        if not extension.has_kernel(backend):
            reason = extension.unavailable_reason() or "it was built without CUDA (no CUDA_HOME or no GPU at build)"
            raise ValueError(
                f"backend={backend!r} needs fastpref's C++ extension (csrc/), which is not available: {reason}. "
                "Use backend='auto' or 'torch'."
            )
        return backend
    from fastpref.ops.pair_loss import interpreter_enabled

    runnable = triton_available() and (device.type == "cuda" or interpreter_enabled())
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs a CUDA tensor and the triton package, or "
            "TRITON_INTERPRET=1 set before fastpref is imported (the CPU interpreter, for tests). "
            "Use backend='auto' or 'torch'."
        )
    if runnable:
        return "triton"
    if device.type in ("cpu", "cuda") and extension.has_kernel(device.type):
        return device.type
    return "torch"


# ----------------------------------------------------------------------------------------------
# The per-pair losses of the fused kernel family.
# ----------------------------------------------------------------------------------------------


def _pair_loss(loss, model_pred, ref_pred, target, ref_err, beta, alpha, reduction, return_stats, backend):
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, ref_pred, target, ref_err)
    resolved = resolve_backend(backend, model_pred.device)
    if resolved == "triton":
        from fastpref.ops.library import triton_pair_loss  # the Triton family as a torch.library op

        if ref_err is not None:
            ref_err = ref_err.contiguous()
        out, u, err = triton_pair_loss(
            loss, model_pred, ref_pred, target, ref_err, beta=beta, alpha=alpha, reduction=reduction
        )
        model_err, ref_err_out = err[0], err[1]
    elif resolved in ("cpu", "cuda"):
        from fastpref.ops.cpp import cpp_pair_loss

        out, u, err = cpp_pair_loss(
            loss, model_pred, ref_pred, target, ref_err, beta=beta, alpha=alpha, reduction=reduction
        )
        model_err, ref_err_out = err[0], err[1]
    else:
        out, u, model_err, ref_err_out = reference.pair_loss_ref(
            loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta, alpha=alpha, reduction=reduction
        )
    if return_stats:
        return out, preference_stats(u, model_err, ref_err_out, beta)
    return out


def dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    beta: float = 5000.0,
    kind: str = "sigmoid",
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-DPO loss (Wallace et al.), fused.

    ``u_i = −½·β·((e_θ[w_i] − e_θ[l_i]) − (e_ref[w_i] − e_ref[l_i]))`` with per-sample mean squared
    errors ``e``; then per pair

    * ``kind="sigmoid"``: ``ℓ = −log σ(u)`` (Diffusion-DPO eq. 9),
    * ``kind="hinge"``: ``ℓ = relu(1 − u)``,
    * ``kind="ipo"``: ``ℓ = (h − 1/(2β))²`` with ``h = Δref − Δθ`` (β plays IPO's τ).

    Args:
        model_pred: ``(2B, *S)`` policy prediction, winners then losers.
        ref_pred: ``(2B, *S)`` frozen reference prediction (no grad). Or pass ``ref_err``.
        target: ``(2B, *S)``, or ``(B, *S)`` shared by each pair (ε-prediction with shared noise).
        ref_err: ``(2B,)`` precomputed reference errors instead of ``ref_pred``.
        beta: β in fastpref's convention (means over S, with the ½): 5000 for SD1.5 and SDXL.
        reduction: ``"mean"`` over pairs, ``"sum"`` or ``"none"`` (``(B,)``).
        return_stats: also return detached :class:`PreferenceStats` (no device sync).
        backend: ``"auto"``, ``"triton"``, ``"cpu"``/``"cuda"`` (the C++/CUDA extension) or
            ``"torch"`` (the reference); see :func:`resolve_backend`.
    """
    beta = _check_positive("beta", beta)
    kind = _check_choice("kind", kind, DPO_KINDS)
    return _pair_loss(kind, model_pred, ref_pred, target, ref_err, beta, 0.5, reduction, return_stats, backend)


def dmpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    beta: float = 2000.0,
    alpha: float = 0.01,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """DMPO loss (seed 002 eq. 14), fused: ``ℓ = KL(Bern σ(u) ‖ Bern(1−α))``.

    ``ℓ = σ(u)·log(σ(u)/(1−α)) + σ(−u)·log(σ(−u)/α)`` with u as in :func:`dpo_loss`; minimal (0) at
    ``u* = log((1−α)/α)`` — the loss stops pushing once the pair is ranked with confidence 1−α.
    Published settings in this β convention: SD1.5 β=2000, α=0.01; SDXL β=6000, α=0.01;
    SD3.5-M β=100, α=0.1. Arguments as :func:`dpo_loss`.
    """
    beta = _check_positive("beta", beta)
    alpha = check_alpha(alpha)
    return _pair_loss("dmpo", model_pred, ref_pred, target, ref_err, beta, alpha, reduction, return_stats, backend)
