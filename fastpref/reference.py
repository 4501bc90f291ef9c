"""The specification: every fastpref loss in plain PyTorch.

Each function here is the readable, upcast (fp32, or fp64 for fp64 input) form of one equation; the
fused kernels in :mod:`fastpref.ops` are tested against these, and ``backend="torch"`` runs them.

Conventions (``shared/DESIGN.md`` §1):

* A batch of B preference pairs is stacked **winners first, then losers**: ``(2B, *S)`` with rows
  ``[w_0 … w_{B-1}, l_0 … l_{B-1}]``.
* Per-sample error ``e[k] = mean_S (pred[k] − target[k])²`` (a mean over the D = |S| elements).
* ``target`` is ``(2B, *S)``, or ``(B, *S)`` when a pair shares it (shared noise, ε-prediction).
* The implicit reward margin is ``u_i = −½·β·(Δθ_i − Δref_i)`` with ``Δ_i = e[w_i] − e[l_i]``;
  the ½ is that of Diffusion-DPO eq. 9 and the Salesforce code, so the published β hold
  (Diffusion-DPO 5000, DMPO 2000 on SD1.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "pair_errors",
    "margin",
    "dpo_sigmoid",
    "dpo_hinge",
    "ipo",
    "dmpo",
    "reduce",
    "pair_loss_ref",
    "PAIR_LOSSES",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the reference never does math in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pair_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, upcast: ``e[k] = mean_S (pred[k] − target[k])²``.

    Args:
        pred: ``(2B, *S)`` model (or reference) prediction, winners then losers.
        target: ``(2B, *S)``, or ``(B, *S)`` shared by the two images of a pair.

    Returns:
        ``(2B,)`` errors in fp32 (fp64 for fp64 input).
    """
    dt = compute_dtype(pred, target)
    n = pred.shape[0]
    p = pred.reshape(n, -1).to(dt)
    t = target.reshape(target.shape[0], -1).to(dt)
    if t.shape[0] != n:  # shared target: winner i and loser i both use row i
        t = torch.cat([t, t])
    return (p - t).square().mean(dim=1)


def margin(model_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit reward margin ``u_i = −½·β·((e_θ[w_i] − e_θ[l_i]) − (e_ref[w_i] − e_ref[l_i]))``.

    Diffusion-DPO eq. 9 with errors as means over S and T·ω(λ_t) folded into β.
    """
    mw, ml = model_err.chunk(2)
    rw, rl = ref_err.chunk(2)
    return -0.5 * beta * ((mw - ml) - (rw - rl))


def dpo_sigmoid(u: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO: ``ℓ = −log σ(u) = softplus(−u)`` (stable for |u| = 1e4)."""
    return F.softplus(-u)


def dpo_hinge(u: torch.Tensor) -> torch.Tensor:
    """Hinge (SLiC) variant: ``ℓ = relu(1 − u)``; equals the diffusers SD1.5 hinge at its β = 2500."""
    return torch.relu(1.0 - u)


def ipo(u: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO with log-ratios replaced by error differences: ``ℓ = (h − 1/(2β))²``.

    ``h_i = Δref_i − Δθ_i = 2·u_i/β``; β plays the role of IPO's τ (the diffusers IPO branch, which
    crashes, writes the same square).
    """
    h = u * (2.0 / beta)
    return (h - 1.0 / (2.0 * beta)).square()


def dmpo(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """DMPO (seed 002 eq. 14): ``KL(Bern σ(u) ‖ Bern(1−α))``.

    ``ℓ = σ(u)·log(σ(u)/(1−α)) + σ(−u)·log(σ(−u)/α)``, evaluated as
    ``σ(u)·(−softplus(−u) − log(1−α)) + σ(−u)·(−softplus(u) − log α)`` so |u| = 1e4 stays finite.
    Its minimum (ℓ = 0) sits at ``u* = log((1−α)/α)``.
    """
    return torch.sigmoid(u) * (-F.softplus(-u) - math.log1p(-alpha)) + torch.sigmoid(-u) * (
        -F.softplus(u) - math.log(alpha)
    )


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` over pairs, ``"sum"``, or ``"none"`` (per-pair losses)."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


#: per-pair losses of the fused kernel family: name -> ``ℓ(u, beta, alpha)``.
PAIR_LOSSES = {
    "sigmoid": lambda u, beta, alpha: dpo_sigmoid(u),
    "hinge": lambda u, beta, alpha: dpo_hinge(u),
    "ipo": lambda u, beta, alpha: ipo(u, beta),
    "dmpo": lambda u, beta, alpha: dmpo(u, alpha),
}


def pair_loss_ref(
    loss: str,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ref_err: torch.Tensor | None = None,
    beta: float,
    alpha: float = 0.01,
    reduction: str = "mean",
):
    """Reference for every per-pair loss: errors → margin u → ``PAIR_LOSSES[loss](u)`` → reduce.

    Returns ``(loss, u, model_err, ref_err)``; the last three are the intermediate values the
    kernels are checked against (``ref_err`` upcast, passed through if it was given).
    """
    model_err = pair_errors(model_pred, target)
    if ref_err is None:
        ref_err = pair_errors(ref_pred, target)
    ref_err = ref_err.to(model_err.dtype)
    u = margin(model_err, ref_err, beta)
    losses = PAIR_LOSSES[loss](u, beta, alpha)
    return reduce(losses, reduction), u, model_err, ref_err
