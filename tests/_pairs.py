"""Shared helpers of the loss tests: seeded inputs, one call per loss name, and the error bound every
fp32-accumulating implementation must meet.

The bound (:func:`check_against_reference`): an implementation reads the stored inputs (bf16, fp16,
fp32 or fp64), does its arithmetic in fp32 and sums each sample's D squared differences in fp32. Its
result is compared with fp64 math on the *same stored values*, and the allowed difference is the
first-order propagation of fp32 rounding through the loss — no per-dtype atol, no "2 × PyTorch's own
low-precision error" slack. A backend that accumulated in bf16 (unit roundoff 2⁻⁸ instead of 2⁻²⁴)
fails it (mutant C1 of tools/mutants.py).
"""

from __future__ import annotations

import math

import torch

import fastpref
from fastpref import reference

#: the per-pair losses of the Diffusion-DPO family (``dpo_loss(kind=...)`` and ``dmpo_loss``)
LOSSES = ("sigmoid", "hinge", "ipo", "dmpo")
#: every loss of the fused kernel family, by its kernel name
FAMILY = LOSSES + ("dro", "mapo", "orpo", "kto")
REF_FREE = ("mapo", "orpo")
UNPAIRED = ("kto",)
#: what csrc/ implements (kto's unpaired rows run on Triton or the reference)
CPP_LOSSES = tuple(x for x in FAMILY if x not in UNPAIRED)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

U32 = 2.0**-24  # unit roundoff of fp32
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# spacing of the smallest subnormals: the absolute error of storing a gradient in that dtype near 0
SUBNORMAL = {torch.float64: 0.0, torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
FP32_TINY = 2.0**-126  # below this an fp32 intermediate may flush to 0
# A term of a per-sample sum goes through at most ⌈D/16⌉ + 16 fp32 additions in either fastpref
# implementation (C++: 16 lanes of ⌈D/16⌉ terms, lanes summed in order, chunks in fp64; Triton: lanes
# of ⌈D/BLOCK⌉ terms, a log2(BLOCK) ≤ 14-deep tree, ≤ 64 splits in fp32 on a GPU; torch: a cascade sum).
CHAIN_SLACK = 16
EVAL_SLACK = 16  # roundings in evaluating ℓ(u) or ∂ℓ/∂e from fp32 errors (a handful of ops, a few ulps each)


def make_pairs(num_pairs, sample_shape, dtype, device, *, shared=False, seed=None, scale=1.0):
    """Seeded random (model_pred, ref_pred, target, beta) with realistic errors: the reference is a
    noisy predictor of the target and the model a small perturbation of the reference, so every error
    is O(1) and the margins are O(1) at the β returned alongside.

    ``seed=None`` draws the seed from torch's global generator, which ``conftest.py`` seeds from the
    test's node id: the inputs of a test are the same on every run."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed)
    n = 2 * num_pairs
    target = torch.randn(num_pairs if shared else n, *sample_shape, generator=g, dtype=torch.float64)
    full_target = torch.cat([target, target]) if shared else target
    ref_pred = full_target + torch.randn(n, *sample_shape, generator=g, dtype=torch.float64)
    model_pred = ref_pred + 0.3 * torch.randn(n, *sample_shape, generator=g, dtype=torch.float64)
    model_pred, ref_pred, target = (x.to(dtype=dtype, device=device) for x in (model_pred, ref_pred, target))
    # β such that |u| ≲ 3 on these inputs (computed on the rounded inputs)
    e_m = reference.pair_errors(model_pred.double(), target.double())
    e_r = reference.pair_errors(ref_pred.double(), target.double())
    d = reference.margin(e_m, e_r, 1.0).abs().max().item()
    beta = scale * 3.0 / max(d, 1e-6)
    return model_pred, ref_pred, target, beta


def labels_for(n, seed=0):
    """KTO labels with both classes present (1 = desirable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    y[0], y[-1] = 1, 0 if n > 1 else 1
    return y


def inputs(loss, num_pairs, sample_shape, dtype, device, shared=False, seed=None):
    """(model_pred, ref_pred, target, labels) for a loss; kto (unpaired) gets an odd number of rows."""
    model_pred, ref_pred, target, _ = make_pairs(num_pairs, sample_shape, dtype, device, shared=shared, seed=seed)
    labels = None
    if loss in UNPAIRED:
        # the model better than the reference (g = e_ref − e_θ > 0): kto's reference point
        # z = max(0, mean g) is not clamped
        n = 2 * num_pairs - 1 if num_pairs > 1 else 1
        model_pred, ref_pred, target = ref_pred[:n], model_pred[:n], target[:n]
        labels = labels_for(n).to(device)
    return model_pred, ref_pred, target, labels


def call(loss, model_pred, ref_pred, target, *, ref_err=None, labels=None, backend="triton", **params):
    """The public function of a loss, by its kernel name."""
    if loss in ("sigmoid", "hinge", "ipo"):
        return fastpref.dpo_loss(model_pred, ref_pred, target, ref_err=ref_err, kind=loss, backend=backend, **params)
    if loss == "dmpo":
        return fastpref.dmpo_loss(model_pred, ref_pred, target, ref_err=ref_err, backend=backend, **params)
    if loss == "dro":
        return fastpref.dro_loss(model_pred, ref_pred, target, ref_err=ref_err, backend=backend, **params)
    if loss == "mapo":
        return fastpref.mapo_loss(model_pred, target, backend=backend, **params)
    if loss == "orpo":
        return fastpref.orpo_loss(model_pred, target, backend=backend, **params)
    return fastpref.kto_loss(model_pred, ref_pred, target, labels, ref_err=ref_err, backend=backend, **params)


def params_for(loss, model_pred, ref_pred, target, ref_err=None):
    """Loss parameters that put the margins at O(1) on these inputs."""
    em = reference.pair_errors(model_pred.double(), target.double())
    if loss == "mapo":
        mw, ml = em.chunk(2)
        gap = (reference.mapo_f(mw, 0.5) - reference.mapo_f(ml, 0.5)).abs().max().item()
        return dict(beta=0.7, snr_value=0.5, num_train_timesteps=3.0 / max(gap, 1e-6))
    if loss == "orpo":
        return dict(beta=2.0, lambda_orpo=0.5)
    er = ref_err.double() if ref_err is not None else reference.pair_errors(ref_pred.double(), target.double())
    if loss in LOSSES:
        beta = 3.0 / max(reference.margin(em, er, 1.0).abs().max().item(), 1e-6)
        return dict(beta=beta, alpha=0.05) if loss == "dmpo" else dict(beta=beta)
    if loss == "dro":
        # a margin m ≥ 0 as far as possible from every kink d_i + m = 0, so that some pairs are active
        # and rounding cannot flip the hinge
        kinks = sorted(reference.margin(em, er, 2.0).tolist())  # ℓ = relu(m − u) bends at m = u_i
        cands = [0.0, 2 * max(kinks) + 1e-3] + [0.5 * (a + b) for a, b in zip(kinks, kinks[1:])]
        best = max((c for c in cands if c >= 0), key=lambda c: min(abs(c - k) for k in kinks))
        return dict(margin=best)
    g = er - em
    spread = (g - g.mean().clamp(min=0)).abs().max().item()  # margins β·(g − z), z = max(0, mean g)
    return dict(beta=3.0 / max(spread, 1e-6), lambda_desirable=1.0, lambda_undesirable=1.5)


def losses_of_errors(loss, model_err, ref_err, labels, p, z=None):
    """The reference's per-pair (kto: per-row) losses as a function of the errors. For kto, ``z``
    given makes the reference point an explicit input (for the error bound; the loss detaches it)."""
    if loss in LOSSES:
        u = reference.margin(model_err, ref_err, p["beta"])
        return reference.PAIR_LOSSES[loss](u, p["beta"], p.get("alpha", 0.5))
    if loss == "mapo":
        return reference.mapo(model_err, p["beta"], p["snr_value"], p["num_train_timesteps"])[0]
    if loss == "orpo":
        return reference.orpo(model_err, p["beta"], p["lambda_orpo"])[0]
    if loss == "dro":
        return reference.dro(model_err, ref_err, p["margin"])[0]
    if z is None:
        return reference.kto(model_err, ref_err, labels, p["beta"], p["lambda_desirable"], p["lambda_undesirable"])[0]
    y = labels.to(torch.bool)
    sign = torch.where(y, 1.0, -1.0).to(model_err.dtype)
    lam = torch.where(y, p["lambda_desirable"], p["lambda_undesirable"]).to(model_err.dtype)
    return lam * (1.0 - torch.sigmoid(sign * p["beta"] * ((ref_err - model_err) - z)))


def _full_target(target, n):
    return target if target.shape[0] == n else torch.cat([target, target])


def error_bound(pred, target, n):
    """Per-sample bound on |e_fp32 − e_fp64| for e = mean_S (pred − target)² computed in fp32 from the
    stored values (fp64 inputs are rounded to fp32 first): a few roundings per term, the longest
    chain of fp32 additions, the 1/D scaling."""
    d_count = pred[0].numel()
    p = pred.detach().reshape(n, -1).double()
    t = _full_target(target.detach(), n).reshape(n, -1).double()
    diff = p - t
    e = diff.square().mean(1)
    chain = math.ceil(d_count / 16) + CHAIN_SLACK
    bound = (chain + 5) * U32 * e
    if pred.dtype == torch.float64 or target.dtype == torch.float64:  # the fp64 → fp32 conversion
        bound = bound + 2 * U32 * (diff.abs() * (p.abs() + t.abs())).mean(1)
    return bound


def _error_model(loss, model_pred, ref_pred, target, ref_err, labels, p, reduction, em64=None, er64=None):
    """The loss as a function of x = (e_θ (n), e_ref (n), z) in fp64, x at the stored inputs, and the
    bound δx on each component's fp32 error."""
    n = model_pred.shape[0]
    t64 = target.detach().double()
    if em64 is None:
        em64 = reference.pair_errors(model_pred.detach().double(), t64)
        if loss in REF_FREE:
            er64 = torch.zeros_like(em64)
        else:
            er64 = ref_err.double() if ref_err is not None else reference.pair_errors(ref_pred.double(), t64)
    de_m = error_bound(model_pred, target, n)
    if loss in REF_FREE:
        de_r = torch.zeros(n, dtype=torch.float64, device=em64.device)
    elif ref_err is not None:
        de_r = (U32 if ref_err.dtype == torch.float64 else 0.0) * er64.abs()
    else:
        de_r = error_bound(ref_pred, target, n)
    em, er = em64.detach(), er64.detach()
    z64 = torch.clamp((er - em).mean(), min=0.0).reshape(1)
    dz = ((de_m + de_r).mean() + 2 * U32 * z64.abs()).reshape(1)
    x0 = torch.cat([em, er, z64])
    dx = torch.cat([de_m, de_r, dz])

    def outputs(x):
        losses = losses_of_errors(loss, x[:n], x[n:2 * n], labels, p, z=x[2 * n] if loss in UNPAIRED else None)
        return reference.reduce(losses, reduction).reshape(-1)

    return x0, dx, outputs


def loss_bound(loss, model_pred, ref_pred, target, *, ref_err=None, labels=None, p, reduction="mean"):
    """(fp64 loss on the stored inputs, bound on an fp32 implementation's error), per output."""
    x0, dx, outputs = _error_model(loss, model_pred, ref_pred, target, ref_err, labels, p, reduction)
    jac = torch.autograd.functional.jacobian(outputs, x0)
    o64 = outputs(x0)
    return o64, (jac.abs() @ dx) + EVAL_SLACK * U32 * (1 + o64.abs() + jac.abs() @ x0.abs()) + FP32_TINY


def check_against_reference(loss, backend, model_pred, ref_pred, target, *, ref_err=None, labels=None,
                            reduction="mean", params=None):  # fmt: skip
    """The backend's loss and gradient (under random per-output upstream weights) against fp64 math on
    the same stored inputs, within the first-order fp32 bound (module docstring).

    Loss: |ℓ − ℓ64| ≤ Σ_x |∂ℓ/∂x|·δx + EVAL_SLACK·u·(1 + |ℓ| + Σ_x |∂ℓ/∂x|·|x|) over the inputs x of
    the loss (the errors, and kto's reference point z). Gradient ∂L/∂pred[k] = c_k·2(pred − target)/D:
    the error of c_k = ∂L/∂e_θ[k] through the Hessian, its own evaluation, a few roundings of the
    product, and the final rounding to model_pred's dtype."""
    n = model_pred.shape[0]
    dtype = model_pred.dtype
    p = params or params_for(loss, model_pred, ref_pred, target, ref_err)
    uses_ref = loss not in REF_FREE
    r_in = ref_pred if uses_ref and ref_err is None else None

    m = model_pred.detach().clone().requires_grad_(True)
    out = call(loss, m, r_in, target, ref_err=ref_err if uses_ref else None, labels=labels, backend=backend,
               reduction=reduction, **p)  # fmt: skip
    weights = torch.rand(out.shape, dtype=torch.float32, device=out.device) + 0.5
    (out * weights).sum().backward()

    # fp64 on the same stored values
    t64 = target.double()
    m64 = model_pred.detach().double().requires_grad_(True)
    em64 = reference.pair_errors(m64, t64)
    if not uses_ref:
        er64 = torch.zeros_like(em64)
    elif ref_err is not None:
        er64 = ref_err.double()
    else:
        er64 = reference.pair_errors(ref_pred.double(), t64)
    out64 = reference.reduce(losses_of_errors(loss, em64, er64, labels, p), reduction)
    w64 = weights.double()
    (out64 * w64).sum().backward()

    x0, dx, outputs = _error_model(loss, model_pred, ref_pred, target, ref_err, labels, p, reduction, em64, er64)
    jac = torch.autograd.functional.jacobian(outputs, x0)  # (outputs, 2n + 1)
    o64 = outputs(x0)
    loss_allow = (jac.abs() @ dx) + EVAL_SLACK * U32 * (1 + o64.abs() + jac.abs() @ x0.abs()) + FP32_TINY

    def total(x):
        return (outputs(x) * w64.reshape(-1)).sum()

    xg = x0.clone().requires_grad_(True)
    (c,) = torch.autograd.grad(total(xg), xg)
    hess = torch.autograd.functional.hessian(total, x0)
    c, hess = c[:n], hess[:n]
    dc = hess.abs() @ dx + EVAL_SLACK * U32 * (c.abs() + hess.abs() @ x0.abs()) + FP32_TINY

    diff = (m64.detach() - _full_target(t64, n)).reshape(n, -1)
    d_count = diff.shape[1]
    g64 = m64.grad.reshape(n, -1)
    # the final store rounds to model_pred's dtype: to nearest on a GPU, toward zero in Triton's
    # interpreter — one ulp (2u), or one subnormal spacing near 0
    grad_allow = (dc[:, None] * 2 * diff.abs() / d_count
                  + (8 * U32 + 2 * UNIT_ROUNDOFF[dtype]) * g64.abs() + SUBNORMAL[dtype])  # fmt: skip
    if dtype == torch.float64 or target.dtype == torch.float64:
        t_abs = _full_target(t64, n).reshape(n, -1).abs()
        grad_allow = grad_allow + c.abs()[:, None] * 2 / d_count * U32 * (m64.detach().reshape(n, -1).abs() + t_abs)

    assert out.dtype in (torch.float32, torch.float64) and out.shape == out64.shape
    assert m.grad.dtype == dtype and m.grad.shape == model_pred.shape
    assert_within(out.reshape(-1), out64.reshape(-1), loss_allow, f"{loss}/{backend} loss")
    assert_within(m.grad.reshape(n, -1), g64, grad_allow, f"{loss}/{backend} grad")


def assert_within(actual, expected64, allow, what):
    """Elementwise |actual − expected| ≤ allow (NaN fails)."""
    err = (actual.double() - expected64.double()).abs()
    bad = ~(err <= allow)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} outside the fp32 bound; first at {i}: "
            f"got {actual.reshape(-1)[i].item():.9g}, fp64 {expected64.reshape(-1)[i].item():.9g}, "
            f"error {err.reshape(-1)[i].item():.3e} > bound {allow.reshape(-1)[i].item():.3e} "
            f"(max error/bound {(err / allow.clamp_min(1e-300)).max().item():.3g})"
        )
