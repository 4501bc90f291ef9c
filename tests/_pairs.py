"""Shared helpers for the pair-loss tests: fresh random inputs and the per-dtype error rule."""

from __future__ import annotations

import torch

from fastpref import reference

LOSSES = ("sigmoid", "hinge", "ipo", "dmpo")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# atol added to the flash-attention rule (|kernel − fp64| ≤ 2·|torch at dtype − fp64| + atol),
# relative to the magnitude of the compared quantity
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def make_pairs(num_pairs, sample_shape, dtype, device, *, shared=False, seed=None, scale=1.0):
    """Fresh random (model_pred, ref_pred, target) with realistic errors: the reference is a
    noisy predictor of the target and the model a small perturbation of the reference, so every
    error is O(1) and the margins are O(1) at the β returned alongside."""
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed() if seed is None else seed)
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


def naive_at_dtype(loss, model_pred, ref_pred, target, *, ref_err=None, beta, alpha, reduction):
    """The same loss computed by PyTorch with no upcast: every op in the input dtype. Its error
    against the fp64 reference is the yardstick of the flash-attention rule."""
    dt = model_pred.dtype
    n = model_pred.shape[0]
    t = target if target.shape[0] == n else torch.cat([target, target])
    e_m = (model_pred - t).square().reshape(n, -1).mean(1)
    e_r = ref_err.to(dt) if ref_err is not None else (ref_pred - t).square().reshape(n, -1).mean(1)
    u = reference.margin(e_m, e_r, beta)
    return reference.reduce(reference.PAIR_LOSSES[loss](u, beta, alpha), reduction)


def fp32_accumulation_allowance(loss, u64, errors64, beta, alpha, weights64, diff_max, reduction, numel):
    """First-order bound on the error any fp32-accumulating implementation makes, whatever its
    summation order: each error e carries |δe| ≤ 2·eps32·|e|, so |δu| ≤ ½β·4·2·eps32·max|e|, which
    moves the loss by |ℓ'(u)|·δu and the gradient coefficient by |ℓ''(u)|·δu·β/D. This is the
    conditioning of u = −½β·Δ (β multiplies a difference of O(1) errors), not a loosened tolerance:
    the flash-attention rule compares against PyTorch's fp32 error, which is at the same level only
    by luck."""
    eps32 = torch.finfo(torch.float32).eps
    du = 4.0 * beta * 2.0 * eps32 * errors64.abs().max().item()
    u = u64.detach().clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(reference.PAIR_LOSSES[loss](u, beta, alpha).sum(), u, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), u) if d1.requires_grad else (torch.zeros_like(u),)
    per_pair = weights64.abs() * d1.detach().abs() * du
    scale = 1.0 / u.numel() if reduction == "mean" else 1.0
    loss_allow = per_pair.max().item() if reduction == "none" else per_pair.sum().item() * scale
    grad_allow = (weights64.abs() * d2.abs()).max().item() * du * beta / numel * diff_max * scale
    return loss_allow, grad_allow


def assert_within_rule(actual, expected64, naive, dtype, what, allowance=0.0):
    """flash-attention rule: error ≤ 2 × PyTorch's own error at that dtype + a small atol (+ the
    fp32-accumulation allowance of the computation, see fp32_accumulation_allowance)."""
    actual, expected64, naive = actual.double(), expected64.double(), naive.double()
    err = (actual - expected64).abs().max().item()
    naive_err = (naive - expected64).abs().max().item()
    bound = 2 * naive_err + ATOL[dtype] * max(1.0, expected64.abs().max().item()) + allowance
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch's own error {naive_err:.3e})"
