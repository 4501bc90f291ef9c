"""The specification: every fastpref loss in plain PyTorch, with the conventions the kernels share.

Each function here is the readable, upcast (fp32, or fp64 for fp64 input) form of one equation; the
fused kernels in :mod:`fastpref.ops` are tested against these, and ``backend="torch"`` runs them.
``docs/losses.md`` has the same math with the mapping to each public training script.

Conventions:

* **Batch layout.** A batch of B preference pairs is stacked **winners first, then losers**:
  ``(2B, *S)`` with rows ``[w_0 … w_{B-1}, l_0 … l_{B-1}]`` — ``torch.cat([pred_w, pred_l])``, the
  layout of the diffusers and Salesforce Diffusion-DPO scripts (their ``.chunk(2)``). Diffusion-DRO
  puts the expert sample in the winner slot; Diffusion-KTO takes N unpaired rows with labels.
* **Per-sample error.** ``e[k] = mean_S (pred[k] − target[k])²``, a **mean** over the D = |S|
  elements (not a sum), as the public scripts' ``mse_loss(..., reduction="none").mean(dims)``.
* ``target`` is ``(2B, *S)``, or ``(B, *S)`` when a pair shares it (shared noise, ε-prediction).
* **β convention.** The implicit reward margin is ``u_i = −½·β·(Δθ_i − Δref_i)`` with
  ``Δ_i = e[w_i] − e[l_i]``; the ½ is that of Diffusion-DPO eq. 9 (Wallace et al., 2023,
  arXiv:2311.12908) and of the Salesforce code (``scale_term = −0.5·beta_dpo``), so the published β
  hold as they are (Diffusion-DPO 5000, DMPO 2000 on SD1.5). A script without the ½ — the diffusers
  SD1.5 ``train_diffusion_dpo.py``, ``logsigmoid(beta_dpo·(ref_diff − model_diff))`` — has
  ``β = 2·beta_dpo``. IPO's β is its τ (target margin ``1/(2β)``), not a DPO β.
* **Reduction.** ``"mean"`` averages over pairs (over samples for KTO; over the global batch for
  RPO across ranks), ``"sum"`` adds them, ``"none"`` returns one loss per pair (sample, row).
* **Dtype.** Errors, margins and losses are computed in fp32 (fp64 when an input is fp64), never in
  half precision; every backend returns that dtype.
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


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (``None`` entries are skipped): the reference never does math
    in half precision. A plain loop: the fused losses ask this on every call."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


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
    """DMPO (Li et al., 2025, arXiv:2507.07510, eq. 14): ``KL(Bern σ(u) ‖ Bern(1−α))``.

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


# ----------------------------------------------------------------------------------------------
# The rest of the loss family. Each takes the upcast per-sample errors
# from :func:`pair_errors`; the fused kernels are tested against these.
# ----------------------------------------------------------------------------------------------

__all__ += [
    "mapo_f",
    "mapo",
    "orpo_log_odds",
    "orpo",
    "kto_reference_point",
    "kto",
    "dro",
    "clip_pair_weights_ref",
    "rpo_pairwise",
    "rpo",
    "orrpo",
    "family_loss",
]


def mapo_f(x: torch.Tensor, snr_value: float) -> torch.Tensor:
    """MaPO's likelihood proxy ``f(x) = s·x / (e^{s·x} − 1)`` (the mapo ``compute_loss`` log-odds term).

    Evaluated as ``y / expm1(y)``, ``y = s·x``, with the Taylor series ``1 − y/2 + y²/12`` for
    |y| < 1e-4 so it is continuous (and differentiable) at 0, where f → 1.
    """
    y = snr_value * x
    small = y.abs() < 1e-4
    big = y > 1.0  # there y·e^{−y}/(1 − e^{−y}): no inf/inf once e^y overflows (e = 1e4)
    one = torch.ones_like(y)
    y_mid = torch.where(small | big, one, y)  # each branch evaluated only where it is finite
    y_big = torch.where(big, y, one)
    return torch.where(
        small,
        1.0 - 0.5 * y + y * y / 12.0,
        torch.where(big, y_big * torch.exp(-y_big) / -torch.expm1(-y_big), y_mid / torch.expm1(y_mid)),
    )


def mapo(model_err: torch.Tensor, beta: float, snr_value: float, num_train_timesteps: float):
    """MaPO (Hong et al., 2024, arXiv:2406.06424; the mapo ``compute_loss``), reference-free. Per pair

        u_i = T·(f(e_θ[w_i]) − f(e_θ[l_i])),   ℓ_i = e_θ[w_i] + β_M·softplus(−u_i)

    so ``mean_i ℓ_i = mean_i e_θ[w_i] − β_M·mean_i log σ(u_i)``: the SFT term on winners plus the
    margin term. f decreases with the error, so u > 0 when the winner is the likelier one.

    Returns ``(losses (B,), u (B,))``.
    """
    mw, ml = model_err.chunk(2)
    u = num_train_timesteps * (mapo_f(mw, snr_value) - mapo_f(ml, snr_value))
    return mw + beta * F.softplus(-u), u


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^{−x})`` for x ≥ 0 (Mächler's two-branch form), with 1 − e^{−x} floored at 1e-30 so a
    perfect prediction (x = 0, infinite odds) gives a finite log-odds."""
    big = x > math.log(2.0)
    xs = torch.where(big, x, torch.full_like(x, math.log(2.0)))  # each branch only where it is finite
    return torch.where(big, torch.log1p(-torch.exp(-xs)), torch.log(torch.clamp(-torch.expm1(-x), min=1e-30)))


def orpo_log_odds(err: torch.Tensor, beta: float) -> torch.Tensor:
    """Log-odds of a sample under the Gaussian-likelihood proxy ``log p = −½·β·e`` (Diffusion-RPO
    paper, Gu et al., 2024, arXiv:2406.06382, App. C): ``log(p / (1 − p)) = −½βe − log(1 − e^{−½βe})``.
    With β = D (the number of latent elements) this is the appendix's ``exp(−½‖ε − ε_θ‖²)`` on summed errors."""
    x = 0.5 * beta * err
    return -x - _log1mexp(x)


def orpo(model_err: torch.Tensor, beta: float, lambda_orpo: float):
    """Diffusion-ORPO (arXiv:2406.06382 App. C, eq. 16 with the diffusion likelihood proxy). Per pair

        r_i = log odds(w_i) − log odds(l_i),   ℓ_i = e_θ[w_i] + λ·softplus(−r_i)

    i.e. SFT on the winner − λ·log σ(r_i), with the sign that favours the winner (r > 0 when the
    winner's error is lower). The diffusers ``diffusion_orpo`` script uses ``logσ(e_w − e_l)``, whose
    gradient raises the winner's error. Returns ``(losses (B,), r (B,))``.
    """
    mw, ml = model_err.chunk(2)
    r = orpo_log_odds(mw, beta) - orpo_log_odds(ml, beta)
    return mw + lambda_orpo * F.softplus(-r), r


def kto_reference_point(g: torch.Tensor, group=None) -> torch.Tensor:
    """Diffusion-KTO's reference point ``z = max(0, mean_k g_k)``, detached (a 0-d tensor).

    With a ``torch.distributed`` process ``group`` the mean runs over the samples of every rank: one
    all-reduce of ``(Σ_k g_k, N)``, no host sync. The diffusion-kto training script averages the
    per-rank means (``accelerator.reduce(g.mean(), reduction="mean")``), which is the same number
    when every rank holds the same N."""
    g = g.detach()
    if group is None:
        return torch.clamp(g.mean(), min=0.0)
    import torch.distributed as dist

    total = torch.stack([g.sum(), g.new_full((), g.numel())])
    dist.all_reduce(total, group=group)
    return torch.clamp(total[0] / total[1], min=0.0)


def kto(model_err, ref_err, labels, beta: float, lambda_desirable: float, lambda_undesirable: float, group=None):
    """Diffusion-KTO, unpaired. Per sample k with label y_k ∈ {0, 1} (1 = desirable)

        g_k = e_ref[k] − e_θ[k],  z = max(0, mean_k g_k) (detached),
        ℓ_k = λ_y·(1 − σ((2y_k − 1)·β·(g_k − z)))

    ``group``: the mean in z runs over every rank's samples (:func:`kto_reference_point`).
    Returns ``(losses (N,), β·(g − z) (N,), z)``.
    """
    g = ref_err - model_err
    z = kto_reference_point(g, group)
    y = labels.to(torch.bool)
    sign = torch.where(y, 1.0, -1.0).to(g.dtype)
    lam = torch.where(y, lambda_desirable, lambda_undesirable).to(g.dtype)
    x = beta * (g - z)
    return lam * (1.0 - torch.sigmoid(sign * x)), x, z


def dro(model_err: torch.Tensor, ref_err: torch.Tensor, margin_m: float):
    """Diffusion-DRO (Wu et al., 2025, arXiv:2510.18353): hinge ranking of expert vs online samples

        d_i = (e_θ − e_ref)[expert_i] − (e_θ − e_ref)[online_i],   ℓ_i = relu(d_i + m)

    (experts stacked first, online samples second). Returns ``(losses (B,), −d (B,))``; −d is the
    margin u of :func:`margin` at β = 2, positive when the expert is ranked above the online sample.
    As in the authors' code (github.com/basiclab/DiffusionDRO, ``train.py`` 753-768): the online error
    is measured at a state x_t of a lagged policy's sampling trajectory against that lagged policy's
    own noise prediction there; the expert error at the preferred image noised at the same t with
    fresh, independent noise. The errors reach this function already computed.
    """
    u = margin(model_err, ref_err, 2.0)
    return torch.relu(margin_m - u), u


def clip_pair_weights_ref(win_emb: torch.Tensor, lose_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Diffusion-RPO weight matrix (arXiv:2406.06382 §2.1): ``W_ij = W̃_ij / Σ_j' W̃_ij'``,
    ``W̃_ij = exp(−d_ij/τ)``, ``d_ij = 1 − cos(a_i, b_j)`` — a row softmax of ``−d/τ`` (stable: the
    row max is subtracted). ``(M, K) × (N, K) → (M, N)``, upcast, no gradient."""
    dt = compute_dtype(win_emb, lose_emb)
    a = F.normalize(win_emb.detach().to(dt), dim=1)
    b = F.normalize(lose_emb.detach().to(dt), dim=1)
    with torch.autocast(device_type=a.device.type, enabled=False):  # τ = 0.01 magnifies a bf16 cosine 100×
        d = 1.0 - a @ b.T
    return torch.softmax(-d / tau, dim=1)


def rpo_pairwise(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, weight_inside: bool) -> torch.Tensor:
    """Per-row losses of the weighted M×N pairwise matrix with ``u_ij = a_i − b_j``:

    * weights outside (arXiv:2406.06382 eq. 9): ``ℓ_i = Σ_j W_ij·softplus(−u_ij)``,
    * weights inside (eq. 15 there, the earlier RPO): ``ℓ_i = (1/N)·Σ_j softplus(−W_ij·u_ij)``.
    """
    u = a[:, None] - b[None, :]
    w = weights.to(u.dtype)
    if weight_inside:
        return F.softplus(-w * u).mean(dim=1)
    return (w * F.softplus(-u)).sum(dim=1)


def rpo(model_err, ref_err, weights, beta: float, weight_inside: bool = False):
    """Diffusion-RPO (Gu et al., 2024, arXiv:2406.06382, eq. 9): winner i against loser j for every i, j of the batch,

        u_ij = −½β·((e_θ[w_i] − e_ref[w_i]) − (e_θ[l_j] − e_ref[l_j])),
        L    = −(1/M)·Σ_i Σ_j W_ij·log σ(u_ij)   (weights outside log σ)

    ``model_err``/``ref_err`` are ``(2M,)`` (winners, losers); ``weights`` is ``(M, M)`` (rows:
    winners). Returns the per-row losses ``(M,)``; their mean is L. With ``W = I`` (or M = 1) this is
    Diffusion-DPO.
    """
    mw, ml = model_err.chunk(2)
    rw, rl = ref_err.chunk(2)
    return rpo_pairwise(-0.5 * beta * (mw - rw), -0.5 * beta * (ml - rl), weights, weight_inside)


def orrpo(model_err, weights, beta: float, lambda_orpo: float, weight_inside: bool = False):
    """Diffusion-ORRPO (arXiv:2406.06382 App. C): ``ℓ_i = e_θ[w_i] + λ·Σ_j W_ij·softplus(−r_ij)`` with
    ``r_ij = log odds(w_i) − log odds(l_j)`` (:func:`orpo_log_odds`). ``W = I`` gives :func:`orpo`."""
    mw, ml = model_err.chunk(2)
    pair = rpo_pairwise(orpo_log_odds(mw, beta), orpo_log_odds(ml, beta), weights, weight_inside)
    return mw + lambda_orpo * pair


def family_loss(loss: str, model_err: torch.Tensor, ref_err: torch.Tensor, *, labels=None, **p):
    """Per-item losses and margins ``(losses, u)`` of each loss of the fused kernel family, from the
    upcast errors (``ref_err`` reads 0 for the reference-free losses), with the loss's parameters by
    name: ``beta`` (all but dro), ``alpha`` (dmpo), ``margin`` (dro), ``snr_value`` and
    ``num_train_timesteps`` (mapo), ``lambda_orpo`` (orpo), ``labels``, ``lambda_desirable`` and
    ``lambda_undesirable`` (kto; u is then β·(g − z) per sample). ``backend="torch"`` runs this."""
    if loss in PAIR_LOSSES:
        u = margin(model_err, ref_err, p["beta"])
        return PAIR_LOSSES[loss](u, p["beta"], p.get("alpha", 0.5)), u
    if loss == "dro":
        return dro(model_err, ref_err, p["margin"])
    if loss == "mapo":
        return mapo(model_err, p["beta"], p["snr_value"], p["num_train_timesteps"])
    if loss == "orpo":
        return orpo(model_err, p["beta"], p["lambda_orpo"])
    if loss == "kto":
        losses, x, _z = kto(model_err, ref_err, labels, p["beta"], p["lambda_desirable"], p["lambda_undesirable"])
        return losses, x
    raise ValueError(f"unknown loss {loss!r}")
