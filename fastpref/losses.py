"""Public loss functions: one validation section, one backend choice, one dispatcher.

Each function takes the stacked model prediction ``(2B, *S)`` — winners first, then losers, the
layout of the diffusers and Salesforce trainers — the reference prediction (or precomputed
``ref_err``) and the target, and returns the loss (and, with ``return_stats=True``, its detached
statistics). Formulas and conventions: :mod:`fastpref.reference` and ``docs/losses.md``.

Every loss runs through the same three steps:

1. validate (:func:`check_pair_inputs` and the scalar checks below);
2. :func:`resolve_backend` picks Triton, the C++/CUDA extension or the PyTorch reference;
3. :func:`_run` (the per-pair kernel family) or :func:`_run_rpo` (the cross-pair RPO matrix) calls
   that backend and applies the output-dtype rule: the loss and statistics are float64 when any
   input tensor is float64, else float32 — on every backend.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from fastpref import reference
from fastpref.ops import extension, triton_available
from fastpref.ops.cpp import cpp_pair_loss
from fastpref.ops.family import CPP_LOSSES, interpreter_enabled, kernel_scalars
from fastpref.stats import KTOStats, PreferenceStats, implicit_accuracy, preference_stats

__all__ = ["dpo_loss", "dmpo_loss", "BACKENDS", "result_dtype"]
__all__ += ["mapo_loss", "orpo_loss", "kto_loss", "dro_loss", "clip_pair_weights", "rpo_loss"]

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


def _check_real(name: str, value) -> float:
    if type(value) is float and -math.inf < value < math.inf:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_positive(name: str, value) -> float:
    if type(value) is float and 0.0 < value < math.inf:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_nonnegative(name: str, value) -> float:
    value = _check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_alpha(alpha) -> float:
    if type(alpha) is float and 0.0 < alpha < 1.0:  # the common case, without the ABC check
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def _check_labels(labels, n: int, device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape ({n},), got {type(labels).__name__}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per sample of model_pred), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but model_pred is on {device}")
    if labels.is_complex():
        raise TypeError(f"labels must be bool, integer or float (1 = desirable, 0 = undesirable), got {labels.dtype}")
    # a value check costs a device sync on a GPU, so only CPU labels are checked; on a GPU any
    # non-zero label counts as desirable
    if labels.device.type == "cpu" and labels.numel() and not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be 0 (undesirable) or 1 (desirable)")


def check_pair_inputs(model_pred, ref_pred, target, ref_err, *, need_ref: bool = True, paired: bool = True) -> int:
    """Validate the loss inputs; returns B, the number of pairs (``paired=False``: N, the number of
    unpaired samples, whose target must have ``model_pred``'s shape)."""
    _check_float_tensor("model_pred", model_pred)
    if paired and (model_pred.dim() < 1 or model_pred.shape[0] < 2 or model_pred.shape[0] % 2):
        raise ValueError(
            "model_pred must have an even leading dimension 2B ≥ 2 (winners stacked first, then "
            f"losers: torch.cat([pred_w, pred_l])), got shape {tuple(model_pred.shape)}"
        )
    if not paired and (model_pred.dim() < 1 or model_pred.shape[0] < 1):
        raise ValueError(f"model_pred must have a leading sample dimension N ≥ 1, got shape {tuple(model_pred.shape)}")
    n = model_pred.shape[0]
    b = n // 2 if paired else n
    if model_pred.numel() == 0:  # the leading dimension is ≥ 1 here
        raise ValueError(f"model_pred has no elements per sample, shape {tuple(model_pred.shape)}")
    sample_shape = model_pred.shape[1:]
    device = model_pred.device

    if target is None:
        raise TypeError("target is required (the noise ε, the velocity, or noise − x0 for flow matching)")
    _check_float_tensor("target", target)
    if paired and (target.shape[1:] != sample_shape or target.shape[0] not in (n, b)):
        raise ValueError(
            f"target must have shape {(n, *sample_shape)} or, shared by each pair, {(b, *sample_shape)}; "
            f"got {tuple(target.shape)}"
        )
    if not paired and target.shape != model_pred.shape:
        raise ValueError(f"target must have model_pred's shape {tuple(model_pred.shape)}, got {tuple(target.shape)}")
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


def _check_embeddings(win_emb, lose_emb, m: int, device) -> None:
    for name, e in (("win_emb", win_emb), ("lose_emb", lose_emb)):
        _check_float_tensor(name, e)
        if e.dim() != 2 or e.shape[0] != m or e.shape[1] < 1:
            raise ValueError(f"{name} must have shape ({m}, K) (one embedding per pair), got {tuple(e.shape)}")
        if e.device != device:
            raise ValueError(f"{name} is on {e.device} but model_pred is on {device}")
    if win_emb.shape[1] != lose_emb.shape[1]:
        raise ValueError(f"win_emb and lose_emb must have the same width K, got {win_emb.shape[1]} and {lose_emb.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Backend choice and the output dtype: the one place for each.
# ----------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device, loss: str | None = None) -> str:
    """Which implementation runs ``loss``: ``"triton"``, ``"cpu"``/``"cuda"`` (the C++/CUDA
    extension in ``csrc/``) or ``"torch"`` (the reference).

    ``"auto"`` → Triton on a CUDA device when the ``triton`` package is installed (or on any device
    under ``TRITON_INTERPRET=1``, which asks for the interpreter explicitly, as the tests do); else
    the C++ extension on a CPU (or CUDA) tensor when it builds and implements ``loss`` (first use
    builds it, cached; a failed build warns once); else the reference. ``"triton"`` on a CPU tensor
    needs the interpreter; ``"cpu"``/``"cuda"`` need the extension, a tensor on that device and a
    loss the extension implements (:data:`fastpref.ops.family.CPP_LOSSES`; not kto, not the RPO
    matrix). ``loss=None`` asks about the pair-loss family in general."""
    _check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    in_cpp = loss is None or loss in CPP_LOSSES
    if backend in ("cpu", "cuda"):
        if not in_cpp:
            names = {"rpo": "rpo_loss", "orrpo": "orpo_loss with weights or embeddings (ORRPO)"}
            name = names.get(loss, f"{loss}_loss")
            raise ValueError(f"{name} has no {backend!r} backend (the C++ extension implements "
                             f"{', '.join(CPP_LOSSES)}); use backend='auto', 'triton' or 'torch'")  # fmt: skip
        if device.type != backend:
            raise ValueError(f"backend={backend!r} runs on {backend} tensors, but model_pred is on {device}")
        if not extension.has_kernel(backend):
            reason = extension.unavailable_reason() or "it was built without CUDA (no CUDA_HOME or no GPU at build)"
            raise ValueError(
                f"backend={backend!r} needs fastpref's C++ extension (csrc/), which is not available: {reason}. "
                "Use backend='auto' or 'torch'."
            )
        return backend
    runnable = triton_available() and (device.type == "cuda" or interpreter_enabled())
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs a CUDA tensor and the triton package, or "
            "TRITON_INTERPRET=1 set before fastpref is imported (the CPU interpreter, for tests). "
            "Use backend='auto' or 'torch'."
        )
    if runnable:
        return "triton"
    if in_cpp and device.type in ("cpu", "cuda") and extension.has_kernel(device.type):
        return device.type
    return "torch"


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype of every loss and statistic fastpref returns, on every backend: float64 when any
    input tensor is float64, else float32 (fp16/bf16 inputs give an fp32 loss). The Triton kernels
    accumulate in fp32 even for fp64 input, so there an fp64 result carries fp32 accuracy."""
    return reference.compute_dtype(*tensors)


# ----------------------------------------------------------------------------------------------
# The dispatcher of the per-pair kernel family (dpo, ipo, dmpo, dro, mapo, orpo, kto).
# ----------------------------------------------------------------------------------------------


class _Out(NamedTuple):
    loss: torch.Tensor  # reduced, or per pair / per sample for reduction="none"
    u: torch.Tensor  # margin (B,), or kto's β·(g − z) (N,)
    model_err: torch.Tensor  # (N,) e_θ
    ref_err: torch.Tensor  # (N,) e_ref (0 for the reference-free losses)


class _FusedOut:
    """:class:`_Out` of a fused kernel: the loss in the result dtype ``dt``; the statistics split from
    the kernel's ``(2, N)`` errors and converted only when read (most calls want only the loss, and
    each tensor op is a measurable share of a small batch's call)."""

    __slots__ = ("loss", "_u", "_err", "_dt")

    def __init__(self, loss: torch.Tensor, u: torch.Tensor, err: torch.Tensor, dt: torch.dtype):
        self.loss, self._u, self._err, self._dt = _to(loss, dt), u, err, dt

    @property
    def u(self) -> torch.Tensor:
        return _to(self._u, self._dt)

    @property
    def model_err(self) -> torch.Tensor:
        return _to(self._err[0], self._dt)

    @property
    def ref_err(self) -> torch.Tensor:
        return _to(self._err[1], self._dt)


def _run(loss, model_pred, ref_pred, target, ref_err, *, reduction, backend, labels=None, **params):
    """Run one loss of the fused family on validated inputs, on the backend :func:`resolve_backend`
    picks. ``params``: the loss's named parameters (:func:`fastpref.ops.family.kernel_scalars` maps
    them to the kernels' scalars; :func:`fastpref.reference.family_loss` reads them by name). Returns
    an :class:`_Out` (or the same fields, :class:`_FusedOut`)."""
    dt = result_dtype(model_pred, ref_pred, target, ref_err)
    resolved = resolve_backend(backend, model_pred.device, loss)
    if resolved == "triton":
        from fastpref.ops.library import triton_pair_loss  # the Triton family as a torch.library op

        beta, c0, c1 = kernel_scalars(loss, **params)
        out, u, err = triton_pair_loss(loss, model_pred, ref_pred, target, ref_err, beta=beta, c0=c0, c1=c1,
                                       reduction=reduction, labels=labels)  # fmt: skip
        return _FusedOut(out, u, err, dt)
    if resolved in ("cpu", "cuda"):
        beta, c0, c1 = kernel_scalars(loss, **params)
        out, u, err = cpp_pair_loss(loss, model_pred, ref_pred, target, ref_err, beta=beta, c0=c0, c1=c1,
                                    reduction=reduction)  # fmt: skip
        return _FusedOut(out, u, err, dt)
    # the reference
    model_err = reference.pair_errors(model_pred, target)
    if ref_pred is not None:
        ref_err_out = reference.pair_errors(ref_pred, target)
    else:
        ref_err_out = torch.zeros_like(model_err) if ref_err is None else ref_err.to(model_err.dtype)
    losses, u = reference.family_loss(loss, model_err, ref_err_out, labels=labels, **params)
    out = reference.reduce(losses, reduction)
    return _Out(_to(out, dt), _to(u, dt), _to(model_err, dt), _to(ref_err_out, dt))


def _to(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t.to(dt)``, without the call where the dtype is ``dt`` already (four such calls are a
    measurable share of a small batch's forward + backward)."""
    return t if t.dtype == dt else t.to(dt)


def _ref_free_stats(u, model_err, reward_fn) -> PreferenceStats:
    """PreferenceStats of a reference-free loss: ``reward = reward_fn(e_θ)`` (MaPO: T·f(e); ORPO: the
    log-odds), so ``margin = reward_win − reward_lose``; the reference errors read 0."""
    u, model_err = u.detach(), model_err.detach()
    mw, ml = model_err.chunk(2)
    zeros = torch.zeros_like(mw)
    return PreferenceStats(
        margin=u, implicit_accuracy=implicit_accuracy(u), model_err_win=mw, model_err_lose=ml,
        ref_err_win=zeros, ref_err_lose=zeros, reward_win=reward_fn(mw), reward_lose=reward_fn(ml),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The losses of the fused kernel family.
# ----------------------------------------------------------------------------------------------


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
    """Diffusion-DPO loss ("Diffusion Model Alignment Using Direct Preference Optimization",
    Wallace et al., 2023, arXiv:2311.12908), fused.

    ``u_i = −½·β·((e_θ[w_i] − e_θ[l_i]) − (e_ref[w_i] − e_ref[l_i]))`` with per-sample mean squared
    errors ``e``; then per pair

    * ``kind="sigmoid"``: ``ℓ = −log σ(u)`` (Diffusion-DPO eq. 9),
    * ``kind="hinge"``: ``ℓ = relu(1 − u)``,
    * ``kind="ipo"``: ``ℓ = (h − 1/(2β))²`` with ``h = Δref − Δθ``: here β is IPO's τ and 1/(2β) the
      target margin, so the DPO default β = 5000 makes the loss ~1e-8; IPO's public code uses β = 0.1
      (``fastpref.train`` defaults to it for ``--loss ipo``).

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

    Returns the loss, float64 when any input is float64, else float32 (:func:`result_dtype`).
    """
    beta = _check_positive("beta", beta)
    kind = _check_choice("kind", kind, DPO_KINDS)
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, ref_pred, target, ref_err)
    r = _run(kind, model_pred, ref_pred, target, ref_err, reduction=reduction, backend=backend, beta=beta)
    return (r.loss, preference_stats(r.u, r.model_err, r.ref_err, beta)) if return_stats else r.loss


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
    """DMPO ("Divergence Minimization Preference Optimization for Diffusion Model Alignment",
    Li et al., 2025, arXiv:2507.07510, eq. 14), fused: ``ℓ = KL(Bern σ(u) ‖ Bern(1−α))``.

    ``ℓ = σ(u)·log(σ(u)/(1−α)) + σ(−u)·log(σ(−u)/α)`` with u as in :func:`dpo_loss`; minimal (0) at
    ``u* = log((1−α)/α)`` — the loss stops pushing once the pair is ranked with confidence 1−α.
    Published settings in this β convention: SD1.5 β=2000, α=0.01; SDXL β=6000, α=0.01;
    SD3.5-M β=100, α=0.1. Arguments as :func:`dpo_loss`.
    """
    beta = _check_positive("beta", beta)
    alpha = check_alpha(alpha)
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, ref_pred, target, ref_err)
    r = _run("dmpo", model_pred, ref_pred, target, ref_err, reduction=reduction, backend=backend, beta=beta,
             alpha=alpha)  # fmt: skip
    return (r.loss, preference_stats(r.u, r.model_err, r.ref_err, beta)) if return_stats else r.loss


def mapo_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """MaPO ("Margin-aware Preference Optimization for Aligning Diffusion Models without Reference",
    Hong et al., 2024, arXiv:2406.06424), reference-free, fused.

    With ``f(x) = s·x/(e^{s·x} − 1)`` (evaluated stably; continuous at 0, where f → 1) and
    ``u_i = T·(f(e_θ[w_i]) − f(e_θ[l_i]))`` per pair,

        ℓ_i = e_θ[w_i] + β·softplus(−u_i),   mean_i ℓ_i = mean_i e_θ[w_i] − β·mean_i log σ(u_i),

    as the mapo ``compute_loss``. Defaults are that script's: β = 0.1 (``--beta_mapo``), s = 0.5
    (``snr_value``), T = 1000 (``num_train_timesteps``). No reference model. Stats: ``margin`` = u,
    ``reward_*`` = T·f(e_θ), ``ref_err_*`` = 0. Other arguments as :func:`dpo_loss`.
    """
    beta = _check_positive("beta", beta)
    snr_value = _check_positive("snr_value", snr_value)
    num_train_timesteps = _check_positive("num_train_timesteps", num_train_timesteps)
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, None, target, None, need_ref=False)
    r = _run("mapo", model_pred, None, target, None, reduction=reduction, backend=backend, beta=beta,
             snr_value=snr_value, num_train_timesteps=num_train_timesteps)  # fmt: skip
    if return_stats:
        return r.loss, _ref_free_stats(r.u, r.model_err, lambda e: num_train_timesteps * reference.mapo_f(e, snr_value))
    return r.loss


def orpo_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    lambda_orpo: float = 0.1,
    beta: float | None = None,
    weights: torch.Tensor | None = None,
    win_emb: torch.Tensor | None = None,
    lose_emb: torch.Tensor | None = None,
    tau: float = 0.01,
    weight_inside: bool = False,
    group=None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-ORPO (Diffusion-RPO paper, Gu et al., 2024, arXiv:2406.06382, App. C; ORPO: Hong et
    al., 2024, arXiv:2403.07691), reference-free; with RPO weights, Diffusion-ORRPO.

    The likelihood proxy ``log p = −½·β·e`` gives ``log odds(e) = −½βe − log(1 − e^{−½βe})`` and,
    per pair, ``r_i = log odds(e_θ[w_i]) − log odds(e_θ[l_i])``:

        ℓ_i = e_θ[w_i] − λ·log σ(r_i)                               (ORPO)
        ℓ_i = e_θ[w_i] − λ·Σ_j W_ij·log σ(log odds(w_i) − log odds(l_j))   (ORRPO, with weights)

    The preference term has the sign that favours the winner (r > 0 when the winner's error is
    lower): the diffusers ``diffusion_orpo`` script's ``logσ(e_w − e_l)`` raises the winner's error.

    Args:
        lambda_orpo: λ, the weight of the odds-ratio term (0.1 = diffusers' ``--beta_orpo``; the
            Diffusion-RPO paper reports λ = 0.005 for ORPO and 0.2 for ORRPO on SDXL).
        beta: the likelihood scale. ``None`` (default) uses β = D, the number of elements per sample,
            which is the appendix's ``exp(−½‖ε − ε_θ‖²)`` on summed errors; the diffusers script's
            ``log p = −e`` is β = 2 (without the log(1 − p) term).
        weights, win_emb, lose_emb, tau, weight_inside, group: as :func:`rpo_loss`; giving weights or
            embeddings selects ORRPO.
    """
    lambda_orpo = _check_positive("lambda_orpo", lambda_orpo)
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, None, target, None, need_ref=False)
    beta = float(model_pred[0].numel()) if beta is None else _check_positive("beta", beta)
    if weights is not None or win_emb is not None or lose_emb is not None:
        return _run_rpo("orpo", model_pred, None, target, None, weights, win_emb, lose_emb, tau, beta, lambda_orpo,
                        weight_inside, group, reduction, return_stats, backend)  # fmt: skip
    if group is not None:
        raise ValueError("group= needs weights or embeddings (ORRPO): plain ORPO has no cross-pair term to gather")
    r = _run("orpo", model_pred, None, target, None, reduction=reduction, backend=backend, beta=beta,
             lambda_orpo=lambda_orpo)  # fmt: skip
    if return_stats:
        return r.loss, _ref_free_stats(r.u, r.model_err, lambda e: reference.orpo_log_odds(e, beta))
    return r.loss


def kto_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_err: torch.Tensor | None = None,
    beta: float = 1000.0,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    group=None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, KTOStats]:
    """Diffusion-KTO ("Aligning Diffusion Models by Optimizing Human Utility", Li et al., 2024,
    arXiv:2404.04465): unpaired samples, each labelled desirable (1) or undesirable (0), fused.

        g_k = e_ref[k] − e_θ[k],   z = max(0, mean_k g_k) (detached),
        ℓ_k = λ_y·(1 − σ((2y_k − 1)·β·(g_k − z)))

    Args:
        model_pred: ``(N, *S)`` policy prediction, any N ≥ 1 (no pairing, no order).
        ref_pred: ``(N, *S)`` frozen reference prediction, or ``None`` with ``ref_err=`` ``(N,)``.
        target: ``(N, *S)``.
        labels: ``(N,)`` bool / integer / float, 1 = desirable, 0 = undesirable.
        beta: β = 1000 (Diffusion-KTO) on mean errors.
        lambda_desirable, lambda_undesirable: λ_D, λ_U, the class weights (1, 1).
        group: a ``torch.distributed`` process group: z is the mean over the samples of every rank
            (one all-reduce of two numbers, no host sync), as the diffusion-kto training script
            reduces it across processes. Every rank of the group must call the loss. z is a constant
            of the loss, so no gradient crosses ranks: ``"mean"`` stays this rank's mean, and DDP's
            gradient average over ranks makes it the global mean when ranks hold the same N.
        reduction: ``"mean"`` over the N samples, ``"sum"``, or ``"none"`` (``(N,)``).
        return_stats: also return :class:`KTOStats` (implicit rewards β(g − z), z, errors, labels).
    """
    beta = _check_positive("beta", beta)
    lambda_desirable = _check_nonnegative("lambda_desirable", lambda_desirable)
    lambda_undesirable = _check_nonnegative("lambda_undesirable", lambda_undesirable)
    _check_choice("reduction", reduction, REDUCTIONS)
    n = check_pair_inputs(model_pred, ref_pred, target, ref_err, paired=False)
    _check_labels(labels, n, model_pred.device)
    params = dict(beta=beta, lambda_desirable=lambda_desirable, lambda_undesirable=lambda_undesirable)
    if group is None:  # z of this batch, inside the fused kernel
        r = _run("kto", model_pred, ref_pred, target, ref_err, reduction=reduction, backend=backend, labels=labels,
                 **params)  # fmt: skip
        z = reference.kto_reference_point(r.ref_err - r.model_err)
    else:
        r, z = _run_kto_group(model_pred, ref_pred, target, ref_err, labels, group, reduction, backend, params)
    if return_stats:
        return r.loss, KTOStats(implicit_reward=r.u.detach(), reference_point=z.detach(),
                                model_err=r.model_err.detach(), ref_err=r.ref_err.detach(),
                                desirable=labels.detach() != 0)  # fmt: skip
    return r.loss


def _run_kto_group(model_pred, ref_pred, target, ref_err, labels, group, reduction, backend, params):
    """:func:`kto_loss` with z over every rank's samples: the per-sample errors (fused on Triton) →
    the all-reduced z → the per-sample losses on the ``(N,)`` errors (:func:`fastpref.reference.kto`).
    Returns ``(_Out, z)``."""
    _world(group)
    if resolve_backend(backend, model_pred.device, "kto") == "triton":
        from fastpref.ops.pair_loss import fused_pair_errors

        model_err, ref_from_pred = fused_pair_errors(model_pred, ref_pred, target)
    else:
        model_err = reference.pair_errors(model_pred, target)
        ref_from_pred = reference.pair_errors(ref_pred, target) if ref_pred is not None else None
    ref_err_out = ref_from_pred if ref_err is None else ref_err.to(model_err.dtype)
    losses, u, z = reference.kto(model_err, ref_err_out, labels, group=group, **params)
    dt = result_dtype(model_pred, ref_pred, target, ref_err)
    out = reference.reduce(losses, reduction)
    return _Out(out.to(dt), u.to(dt), model_err.to(dt), ref_err_out.to(dt)), z.to(dt)


def dro_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    margin: float = 0.001,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-DRO ("Ranking-based Preference Optimization for Diffusion Models from Implicit User
    Feedback", Yi-Lun Wu et al., 2025, arXiv:2510.18353): hinge ranking of expert (offline) samples above
    online samples.

        d_i = (e_θ − e_ref)[expert_i] − (e_θ − e_ref)[online_i],   ℓ_i = relu(d_i + m),  m = 0.001

    ``model_pred`` stacks the B expert samples first, then the B online samples (the pair layout of
    :func:`dpo_loss`, expert in the winner slot); ``target`` is then ``(2B, *S)``, since the halves share
    no noise. In the authors' code (github.com/basiclab/DiffusionDRO, ``train.py`` lines 753-768, and
    ``misc/buffer.py`` ``ReplayBuffer.callback_fn``), a lagged copy of the policy (refreshed from it
    every few steps) samples an image for the prompt; an online sample i is a state x_t of that
    sampling trajectory, and its target is the lagged copy's own noise prediction at x_t. The expert
    sample is the preferred image noised at the same t with fresh, independent noise, its target that
    noise. Only t is shared. The policy and the reference then run on both halves.
    ``fastpref-train --loss dro`` builds these halves (``fastpref/train/dro.py``). Stats: ``margin`` = −d
    (β = 2 in :class:`PreferenceStats`). Other arguments as :func:`dpo_loss`.
    """
    margin = _check_nonnegative("margin", margin)
    _check_choice("reduction", reduction, REDUCTIONS)
    check_pair_inputs(model_pred, ref_pred, target, ref_err)
    r = _run("dro", model_pred, ref_pred, target, ref_err, reduction=reduction, backend=backend, margin=margin)
    return (r.loss, preference_stats(r.u, r.model_err, r.ref_err, 2.0)) if return_stats else r.loss


# ----------------------------------------------------------------------------------------------
# Diffusion-RPO: every winner against every loser (the fused weight-matrix kernel, ops/rpo.py).
# ----------------------------------------------------------------------------------------------


def clip_pair_weights(win_emb: torch.Tensor, lose_emb: torch.Tensor, *, tau: float = 0.01) -> torch.Tensor:
    """The Diffusion-RPO weight matrix (Gu et al., 2024, arXiv:2406.06382, §2.1) as an explicit
    ``(M, N)`` fp32 tensor.

    ``W_ij = exp(−d_ij/τ) / Σ_j' exp(−d_ij'/τ)``, ``d_ij = 1 − cos(win_emb_i, lose_emb_j)``: each row
    sums to 1 (a row softmax, computed stably). No gradient. :func:`rpo_loss` computes the same
    weights inside its fused kernel without storing them; this function is for inspection, logging
    and the ``weights=`` argument. τ = 0.01 (SD1.5) / 0.5 (SDXL).
    """
    tau = _check_positive("tau", tau)
    for name, e in (("win_emb", win_emb), ("lose_emb", lose_emb)):
        _check_float_tensor(name, e)
        if e.dim() != 2 or e.shape[0] < 1 or e.shape[1] < 1:
            raise ValueError(f"{name} must have shape (M, K), got {tuple(e.shape)}")
    if win_emb.shape[1] != lose_emb.shape[1] or win_emb.device != lose_emb.device:
        raise ValueError("win_emb and lose_emb must have the same width K and device, got "
                         f"{tuple(win_emb.shape)} on {win_emb.device} and {tuple(lose_emb.shape)} on {lose_emb.device}")  # fmt: skip
    return reference.clip_pair_weights_ref(win_emb, lose_emb, tau).float()


def _world(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= needs an initialised torch.distributed process group (dist.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _run_rpo(kind, model_pred, ref_pred, target, ref_err, weights, win_emb, lose_emb, tau, beta, lambda_orpo,
             weight_inside, group, reduction, return_stats, backend):  # fmt: skip
    """Diffusion-RPO (``kind="sigmoid"``) and Diffusion-ORRPO (``kind="orpo"``) on validated pair inputs:
    errors → (gather the losers across ranks) → the weighted M×N pairwise matrix → per-row losses →
    reduction, on the backend :func:`resolve_backend` picks (Triton or the reference)."""
    from fastpref.ops.distributed import gather_constant, gather_losers

    _check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(weight_inside, bool):
        raise TypeError(f"weight_inside must be a bool, got {type(weight_inside).__name__}")
    m = model_pred.shape[0] // 2
    device = model_pred.device
    world, rank = _world(group) if group is not None else (1, 0)
    if weights is not None:
        if win_emb is not None or lose_emb is not None:
            raise TypeError("pass either weights= or win_emb= and lose_emb=, not both")
        _check_float_tensor("weights", weights)
        if weights.shape != (m, m * world):
            raise ValueError(f"weights must have shape ({m}, {m * world}) (this rank's winners × all losers), "
                             f"got {tuple(weights.shape)}")  # fmt: skip
        if weights.device != device:
            raise ValueError(f"weights is on {weights.device} but model_pred is on {device}")
        weights = weights.detach()  # the weights are constants of the loss
    else:
        if win_emb is None or lose_emb is None:
            raise TypeError("pass weights= (M×M) or both win_emb= and lose_emb= (M×K CLIP embeddings)")
        _check_embeddings(win_emb, lose_emb, m, device)
        tau = _check_positive("tau", tau)
        win_emb, lose_emb = win_emb.detach(), lose_emb.detach()
    use_triton = resolve_backend(backend, device, "rpo" if kind == "sigmoid" else "orrpo") == "triton"

    # 1. per-sample errors (e_ref = 0 for the reference-free ORRPO)
    if use_triton:
        from fastpref.ops.pair_loss import fused_pair_errors

        model_err, ref_from_pred = fused_pair_errors(model_pred, ref_pred, target)
    else:
        model_err = reference.pair_errors(model_pred, target)
        ref_from_pred = reference.pair_errors(ref_pred, target) if ref_pred is not None else torch.zeros_like(model_err)
    ref_err_out = ref_from_pred if ref_err is None else ref_err.to(device=device, dtype=model_err.dtype)
    mw, ml = model_err.chunk(2)
    rw, rl = ref_err_out.chunk(2)

    # 2. the matrix spans the global batch: every rank's losers (autograd-aware for e_θ)
    if group is not None:
        ml_all, rl_all = gather_losers(ml, rl.detach(), group)
        lose_all = gather_constant(lose_emb, group) if weights is None else None
    else:
        ml_all, rl_all, lose_all = ml, rl, lose_emb

    # 3. per-row losses ℓ_i = Σ_j W_ij ℓ(a_i − b_j)
    if use_triton:
        from fastpref.ops.rpo import fused_rpo_rows

        rows = fused_rpo_rows(kind, mw, ml_all, rw, rl_all, weights, win_emb, lose_all, tau=tau, beta=beta,
                              weight_inside=weight_inside)  # fmt: skip
    else:
        w = weights if weights is not None else reference.clip_pair_weights_ref(win_emb, lose_all, tau)
        if kind == "orpo":
            a, b = reference.orpo_log_odds(mw, beta), reference.orpo_log_odds(ml_all, beta)
        else:
            a, b = -0.5 * beta * (mw - rw), -0.5 * beta * (ml_all - rl_all)
        rows = reference.rpo_pairwise(a, b, w, weight_inside)
    if kind == "orpo":
        rows = mw + lambda_orpo * rows
    # "mean" averages over the global batch, so the ranks' losses add up to the global loss
    out = rows.sum() / (m * world) if reduction == "mean" else reference.reduce(rows, reduction)
    dt = result_dtype(model_pred, ref_pred, target, ref_err)
    out, model_err, ref_err_out = out.to(dt), model_err.to(dt), ref_err_out.to(dt)

    if return_stats:  # the diagonal pairs (i, i): the DPO / ORPO statistics of this rank's pairs
        if kind == "orpo":
            mw, ml = model_err.chunk(2)
            u = reference.orpo_log_odds(mw, beta) - reference.orpo_log_odds(ml, beta)
            return out, _ref_free_stats(u, model_err, lambda e: reference.orpo_log_odds(e, beta))
        return out, preference_stats(reference.margin(model_err, ref_err_out, beta), model_err, ref_err_out, beta)
    return out


def rpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    win_emb: torch.Tensor | None = None,
    lose_emb: torch.Tensor | None = None,
    tau: float = 0.01,
    beta: float = 5000.0,
    weight_inside: bool = False,
    group=None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-RPO ("Diffusion-RPO: Aligning Diffusion Models through Relative Preference
    Optimization", Gu et al., 2024, arXiv:2406.06382, eq. 9): every winner i against every loser j.

        d_ij = 1 − cos(a_i, b_j),  W_ij = exp(−d_ij/τ) / Σ_j' exp(−d_ij'/τ)
        u_ij = −½β·((e_θ[w_i] − e_ref[w_i]) − (e_θ[l_j] − e_ref[l_j]))
        L    = −(1/M)·Σ_i Σ_j W_ij·log σ(u_ij)                  (weights outside log σ)

    On ``backend="triton"`` one fused kernel computes the cosines, the stable online row
    normalisation and the weighted loss and its gradient, tiling over j: nothing M×M is stored.
    With M = 1 (or W = I) this is :func:`dpo_loss`. The C++ extension has no kernel for the matrix:
    ``backend="auto"`` runs Triton or the reference.

    Args:
        model_pred, ref_pred, target, ref_err: as :func:`dpo_loss` (M pairs).
        weights: ``(M, M)`` weight matrix (rows: winners, columns: losers) instead of embeddings;
            used as given (no normalisation, no gradient).
        win_emb, lose_emb: ``(M, K)`` embeddings of (winner image, prompt) and (loser image, prompt),
            e.g. from :func:`fastpref.clip.pair_embeddings`; normalised here. No gradient.
        tau: τ = 0.01 (SD1.5), 0.5 (SDXL).
        beta: β = 5000 in fastpref's convention (the paper's β with the ½).
        weight_inside: the earlier RPO form (the paper's eq. 15): ``−(1/M²)·Σ_ij log σ(W_ij·u_ij)``.
        group: a ``torch.distributed`` process group: the losers' errors (autograd-aware) and
            embeddings of every rank are gathered so the matrix spans the global batch (every rank
            must hold the same M). Each rank computes its own winners' rows and returns its share of
            the global loss — the shares add up to the global loss, and each rank's gradient w.r.t.
            its ``model_pred`` is that of the global loss. DDP *averages* gradients over ranks, so
            multiply the loss by the world size before ``backward()`` to train on the global loss.
        reduction: ``"mean"`` (the global 1/M), ``"sum"``, or ``"none"`` (this rank's ``(M,)`` rows).
        return_stats: :class:`PreferenceStats` of the diagonal pairs (i, i) — the DPO statistics.
    """
    beta = _check_positive("beta", beta)
    check_pair_inputs(model_pred, ref_pred, target, ref_err)
    return _run_rpo("sigmoid", model_pred, ref_pred, target, ref_err, weights, win_emb, lose_emb, tau, beta, 0.0,
                    weight_inside, group, reduction, return_stats, backend)  # fmt: skip
