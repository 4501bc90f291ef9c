"""Diffusion-RPO / ORRPO: the fused weight-matrix kernel against the reference, M = 1 equals DPO,
large M, the CLIP helper, and the global batch across 2 gloo processes."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _pairs import EVAL_SLACK, SUBNORMAL, U32, UNIT_ROUNDOFF, assert_within, error_bound, make_pairs

import fastpref
from fastpref import reference

EPS32 = torch.finfo(torch.float32).eps


def embeddings(m, k, device, seed=0, spread=0.3, n=None):
    """Winner/loser embeddings with a meaningful structure: loser j is a noisy copy of winner j."""
    g = torch.Generator().manual_seed(seed)
    win = torch.randn(m, k, generator=g)
    lose = win[: n or m] + spread * torch.randn(n or m, k, generator=g) if (n or m) <= m else torch.randn(n, k, generator=g)
    return win.to(device), lose.to(device)


def rows_of_errors(kind, em, er, w, beta, lam, inside):
    """Per-row reference losses as a function of the errors (any dtype)."""
    if kind == "orrpo":
        return reference.orrpo(em, w, beta, lam, inside)
    return reference.rpo(em, er, w, beta, inside)


def call(kind, model_pred, ref_pred, target, backend="triton", **kw):
    if kind == "orrpo":
        return fastpref.orpo_loss(model_pred, target, backend=backend, **kw)
    return fastpref.rpo_loss(model_pred, ref_pred, target, backend=backend, **kw)


def check(kind, source, inside, m, dtype, device, *, k=24, tau=0.5, reduction="mean", seed=None, noncontig=False):
    model_pred, ref_pred, target, beta = make_pairs(m, (3, 7), dtype, device, seed=seed)
    if kind == "orrpo":
        beta = 2.0
    lam = 0.5
    win, lose = embeddings(m, k, device, seed=seed or 0)
    if noncontig:  # strided views: every other column of a wider matrix
        win = torch.stack([win, win], dim=2).reshape(m, 2 * k)[:, ::2]
        lose = torch.stack([lose, lose], dim=2).reshape(m, 2 * k)[:, ::2]
        assert not win.is_contiguous()
    w64 = reference.clip_pair_weights_ref(win.double(), lose.double(), tau)
    kw = dict(weight_inside=inside, reduction=reduction)
    kw.update(beta=beta) if kind == "rpo" else kw.update(beta=beta, lambda_orpo=lam)
    if source == "emb":
        kw.update(win_emb=win, lose_emb=lose, tau=tau)
    else:
        w_in = w64.float() * (1.0 + torch.rand(m, m, device=device))  # arbitrary, not normalised
        if noncontig:
            w_in = w_in.T.contiguous().T
        w64 = w_in.double()
        kw.update(weights=w_in)

    mp = model_pred.detach().clone().requires_grad_(True)
    out = call(kind, mp, ref_pred, target, **kw)
    up = torch.rand(out.shape, device=device) + 0.5
    (out * up).sum().backward()

    def total(e, er, w, dt):
        rows = rows_of_errors(kind, e, er, w.to(dt), beta, lam, inside)
        red = rows.mean() if reduction == "mean" else reference.reduce(rows, reduction)
        return (red * up.to(dt)).sum(), red

    m64 = model_pred.detach().double().requires_grad_(True)
    em64 = reference.pair_errors(m64, target.double())
    er64 = reference.pair_errors(ref_pred.double(), target.double()) if kind == "rpo" else torch.zeros_like(em64)
    t64, out64 = total(em64, er64, w64, torch.float64)
    t64.backward()

    # the fp32 bound (tests/_pairs.py): accumulation of the errors, and the cosines (|δs| ≤ 4·K·eps32/τ
    # moves W_ij by ≤ 2|δs|·W_ij through exp and the normaliser), to first order via fp64 derivatives
    n = model_pred.shape[0]
    de = error_bound(model_pred, target, n) + (error_bound(ref_pred, target, n) if kind == "rpo" else 0.0)
    e0 = em64.detach()
    rel_w = 2 * 4 * k * EPS32 / tau if source == "emb" else 2 * EPS32
    jac = torch.autograd.functional.jacobian(lambda x: total(x, er64, w64, torch.float64)[1].reshape(-1), e0)
    o64 = out64.detach().reshape(-1)
    loss_allow = jac.abs() @ de + 2 * rel_w * o64.abs() + EVAL_SLACK * U32 * (1 + o64.abs() + jac.abs() @ e0.abs())
    e = e0.clone().requires_grad_(True)
    (g_e,) = torch.autograd.grad(total(e, er64, w64, torch.float64)[0], e)
    hess = torch.autograd.functional.hessian(lambda x: total(x, er64, w64, torch.float64)[0], e0)
    dc = hess.abs() @ de + g_e.abs() * (EVAL_SLACK * U32 + 2 * rel_w) + EVAL_SLACK * U32 * (hess.abs() @ e0.abs())
    t_full = torch.cat([target, target]) if target.shape[0] != n else target
    diff = (m64.detach() - t_full.double()).reshape(n, -1)
    g64 = m64.grad.reshape(n, -1)
    grad_allow = (dc[:, None] * 2 * diff.abs() / diff.shape[1] + (8 * U32 + 2 * UNIT_ROUNDOFF[dtype]) * g64.abs()
                  + SUBNORMAL[dtype])  # fmt: skip

    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert mp.grad.dtype == dtype and mp.grad.shape == model_pred.shape
    assert_within(out.reshape(-1), o64, loss_allow, f"{kind} loss")
    assert_within(mp.grad.reshape(n, -1), g64, grad_allow, f"{kind} grad")


@pytest.mark.parametrize("kind", ["rpo", "orrpo"])
@pytest.mark.parametrize("source", ["emb", "weights"])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
@pytest.mark.parametrize("m", [1, 37])
def test_matches_reference(kind, source, inside, m, device):
    check(kind, source, inside, m, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["rpo", "orrpo"])
def test_low_precision_inputs(kind, dtype, device):
    check(kind, "emb", False, 6, dtype, device)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_reductions_with_per_row_upstream_gradients(reduction, inside, device):
    """reduction="none" with per-row weights: the column kernel takes g_i inside the sum."""
    check("rpo", "emb", inside, 7, torch.float32, device, reduction=reduction)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ref_err_and_shared_target_forms(backend, device):
    """ref_err= instead of ref_pred, and a (B, *S) target shared by each pair, give the same loss."""
    model_pred, ref_pred, target, beta = make_pairs(5, (3, 6), torch.float32, device, shared=True, seed=4)
    win, lose = embeddings(5, 8, device, seed=4)
    kw = dict(win_emb=win, lose_emb=lose, beta=beta, tau=0.1, backend=backend)
    res = []
    for rp, re, tg in ((ref_pred, None, target), (None, reference.pair_errors(ref_pred, target), target),
                       (ref_pred, None, torch.cat([target, target]))):  # fmt: skip
        m = model_pred.clone().requires_grad_(True)
        out = fastpref.rpo_loss(m, rp, tg, ref_err=re, **kw)
        out.backward()
        res.append((out.detach(), m.grad))
    for out, grad in res[1:]:
        torch.testing.assert_close(out, res[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, res[0][1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_keeps_the_weights_in_fp32(backend, device):
    model_pred, ref_pred, target, beta = make_pairs(6, (4, 5), torch.float32, device)
    win, lose = embeddings(6, 64, device, spread=0.05)
    kw = dict(win_emb=win, lose_emb=lose, beta=beta, tau=0.01, backend=backend)
    expected = fastpref.rpo_loss(model_pred, ref_pred, target, **kw)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        got = fastpref.rpo_loss(model_pred, ref_pred, target, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_noncontiguous_embeddings_and_weights(device):
    check("rpo", "emb", False, 9, torch.float32, device, noncontig=True)
    check("rpo", "weights", False, 9, torch.float32, device, noncontig=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_pair_is_dpo(backend, device):
    """M = 1: W = [[1]] whatever the embeddings, and RPO is Diffusion-DPO."""
    model_pred, ref_pred, target, beta = make_pairs(1, (4, 9), torch.float32, device)
    win, lose = embeddings(1, 16, device)
    grads = []
    for fn in (lambda m: fastpref.rpo_loss(m, ref_pred, target, win_emb=win, lose_emb=lose, beta=beta, backend=backend),
               lambda m: fastpref.dpo_loss(m, ref_pred, target, beta=beta, backend=backend)):  # fmt: skip
        m = model_pred.clone().requires_grad_(True)
        out = fn(m)
        out.backward()
        grads.append((out.detach(), m.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_identity_weights_are_dpo_and_orpo(backend, device):
    model_pred, ref_pred, target, beta = make_pairs(4, (3, 5), torch.float32, device)
    eye = torch.eye(4, device=device)
    for got, want in (
        (lambda m: fastpref.rpo_loss(m, ref_pred, target, weights=eye, beta=beta, backend=backend),
         lambda m: fastpref.dpo_loss(m, ref_pred, target, beta=beta, backend=backend)),
        (lambda m: fastpref.orpo_loss(m, target, weights=eye, beta=2.0, backend=backend),
         lambda m: fastpref.orpo_loss(m, target, beta=2.0, backend=backend)),
    ):  # fmt: skip
        res = []
        for fn in (got, want):
            m = model_pred.clone().requires_grad_(True)
            out = fn(m)
            out.backward()
            res.append((out.detach(), m.grad))
        torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["sigmoid"])  # orpo's transform is covered at M ≤ 37 above
def test_large_batch_kernel_matches_reference(kind, device):
    """M = 4096 (16.7 M pairs in the matrix) through the tiled kernel, which stores O(M); the fp64
    reference materialises W (134 MB). The errors are given directly: the pair-error kernel is
    tested above and 4096 of its programs would only slow the interpreter down."""
    from fastpref.ops.rpo import fused_rpo_rows

    m, k, tau, beta = 4096, 16, 0.05, (3.0 if kind == "sigmoid" else 2.0)
    g = torch.Generator().manual_seed(7)
    win, lose = embeddings(m, k, device, seed=7)
    mw, ml, rw, rl = (torch.rand(m, generator=g, dtype=torch.float64).add(0.5).to(device) for _ in range(4))
    a, b = mw.float().requires_grad_(True), ml.float().requires_grad_(True)
    rows = fused_rpo_rows(kind, a, b, rw.float(), rl.float(), None, win, lose, tau=tau, beta=beta, weight_inside=False)
    up = torch.rand(m, generator=g).to(device)
    (rows * up).sum().backward()

    a64, b64 = mw.clone().requires_grad_(True), ml.clone().requires_grad_(True)
    w64 = reference.clip_pair_weights_ref(win.double(), lose.double(), tau)
    if kind == "sigmoid":
        rows64 = reference.rpo(torch.cat([a64, b64]), torch.cat([rw, rl]), w64, beta)
    else:
        rows64 = reference.orrpo(torch.cat([a64, b64]), w64, beta, 1.0) - a64  # the pairwise term alone
    (rows64 * up.double()).sum().backward()
    # every ℓ_i is a convex combination; fp32 rounding of the exponent (|δs| ≲ 4·K·eps32/τ), of the
    # errors and of the logits bound the error
    rel = 2 * 4 * k * EPS32 / tau + 16 * EPS32 * beta
    for got, want in ((rows, rows64), (a.grad, a64.grad), (b.grad, b64.grad)):
        err = (got.double() - want).abs().max().item()
        assert err <= (rel + EVAL_SLACK * U32) * want.abs().max().item(), err


def test_clip_pair_weights_rows_are_a_softmax(device):
    win, lose = embeddings(5, 12, device, n=8)
    for tau in (1e-4, 0.01, 0.5):
        w = fastpref.clip_pair_weights(win, lose, tau=tau)
        assert w.shape == (5, 8) and w.dtype == torch.float32 and torch.isfinite(w).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones(5, device=device), rtol=0, atol=1e-6)
    a, b = win.double(), lose.double()
    cos = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])
    wt = torch.exp(-(1 - cos) / 0.5)
    torch.testing.assert_close(fastpref.clip_pair_weights(a, b, tau=0.5).double(), wt / wt.sum(1, keepdim=True),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def unrelated_embeddings(m, k, device, seed=0):
    """Winners around one direction, losers around the opposite one: every cosine ≲ −0.5, so every
    d_ij = 1 − cos ≳ 1.5 and exp(−d_ij/τ) underflows fp32 (< 2⁻¹⁴⁹) for τ ≤ 1e-2 in *every* row —
    only a normaliser that subtracts the row max of −d/τ gets finite weights."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.zeros(k)
    axis[0] = 4.0
    win = axis + torch.randn(m, k, generator=g)
    lose = -axis + torch.randn(m, k, generator=g)
    return win.to(device), lose.to(device)


@pytest.mark.parametrize("tau", [1e-3, 1e-2])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_unrelated_embeddings_at_small_tau(tau, inside, device):
    """Rows whose every weight underflows without the max trick: loss and gradient finite and equal to
    the fp64 reference (a row softmax of −d/τ)."""
    m, k = 7, 16
    model_pred, ref_pred, target, beta = make_pairs(m, (3, 5), torch.float32, device)
    win, lose = unrelated_embeddings(m, k, device)
    cos = torch.nn.functional.normalize(win.double(), dim=1) @ torch.nn.functional.normalize(lose.double(), dim=1).T
    assert ((1 - cos) / tau > 104).all()  # exp(−d/τ) < 2⁻¹⁴⁹ for every pair: all of W̃ underflows in fp32
    kw = dict(win_emb=win, lose_emb=lose, tau=tau, beta=beta, weight_inside=inside, reduction="none")
    mp = model_pred.clone().requires_grad_(True)
    got = fastpref.rpo_loss(mp, ref_pred, target, backend="triton", **kw)
    up = torch.rand(m, device=device) + 0.5
    (got * up).sum().backward()
    m64 = model_pred.double().requires_grad_(True)
    want = fastpref.rpo_loss(m64, ref_pred.double(), target.double(), backend="torch",
                             **{**kw, "win_emb": win.double(), "lose_emb": lose.double()})  # fmt: skip
    (want * up.double()).sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(mp.grad).all()
    w = fastpref.clip_pair_weights(win, lose, tau=tau)
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(m, device=device))
    # fp32 cosines: |δs| ≤ 4·K·eps32/τ moves each weight by ≤ 2|δs| relative
    rel = 2 * 4 * k * EPS32 / tau + 64 * EPS32
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=1e-6)
    torch.testing.assert_close(mp.grad.double(), m64.grad, rtol=rel, atol=rel * m64.grad.abs().max().item())


def test_near_duplicate_losers_at_small_tau(device):
    """τ = 1e-3 with each loser a near copy of its winner: the off-diagonal weights underflow, the
    diagonal ones do not; the online normaliser equals the reference."""
    model_pred, ref_pred, target, beta = make_pairs(40, (5,), torch.float32, device, seed=2)
    win, lose = embeddings(40, 32, device, seed=2, spread=0.05)
    kw = dict(win_emb=win, lose_emb=lose, tau=1e-3, beta=beta, reduction="none")
    got = fastpref.rpo_loss(model_pred, ref_pred, target, backend="triton", **kw)
    want = fastpref.rpo_loss(model_pred.double(), ref_pred.double(), target.double(), backend="torch",
                             **{**kw, "win_emb": win.double(), "lose_emb": lose.double()})  # fmt: skip
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)


# ---- independent of fastpref/reference.py ---------------------------------------------------------


def _closed_form_rpo(kind, errors_w, errors_l, refs_w, refs_l, win, lose, tau, beta, lam, inside):
    """Diffusion-RPO (Gu et al. 2024, arXiv:2406.06382) eq. 9 / eq. 15 and ORRPO (App. C), with ``math``:
    W_ij = exp(−d_ij/τ)/Σ_j' exp(−d_ij'/τ), d_ij = 1 − cos(a_i, b_j);
    RPO: x_i = −½β(e_θ[w_i] − e_ref[w_i]), y_j = −½β(e_θ[l_j] − e_ref[l_j]), dx/de = −½β;
    ORRPO: x = log odds = log(p/(1 − p)), log p = −½βe, dx/de = −½β/(1 − p);
    outside: L = (1/M)·Σ_ij W_ij·(−log σ(x_i − y_j)); inside: L = (1/M²)·Σ_ij −log σ(W_ij·(x_i − y_j));
    ORRPO adds (1/M)·Σ_i e_θ[w_i]. Returns (L, ∂L/∂e_θ[w], ∂L/∂e_θ[l])."""
    m = len(errors_w)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    w = []
    for a in win:
        row = [math.exp(-(1 - cos(a, b)) / tau) for b in lose]
        w.append([x / sum(row) for x in row])

    def logit(e, r):
        if kind == "orrpo":
            p = math.exp(-0.5 * beta * e)
            return math.log(p / (1 - p)), -0.5 * beta / (1 - p)
        return -0.5 * beta * (e - r), -0.5 * beta

    xs = [logit(e, r) for e, r in zip(errors_w, refs_w)]
    ys = [logit(e, r) for e, r in zip(errors_l, refs_l)]
    total, gw, gl = 0.0, [0.0] * m, [0.0] * m
    scale = 1.0 / (m * m) if inside else 1.0 / m
    for i, (x, dx) in enumerate(xs):
        for j, (y, dy) in enumerate(ys):
            z = (w[i][j] if inside else 1.0) * (x - y)
            weight = 1.0 if inside else w[i][j]
            sig = 1 / (1 + math.exp(-z))
            total += scale * weight * -math.log(sig)
            dz = scale * weight * -(1 - sig) * (w[i][j] if inside else 1.0)  # ∂/∂(x − y)
            gw[i] += dz * dx
            gl[j] -= dz * dy
    if kind == "orrpo":
        return sum(errors_w) / m + lam * total, [1.0 / m + lam * g for g in gw], [lam * g for g in gl]
    return total, gw, gl


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["rpo", "orrpo"])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_closed_form(backend, kind, inside, device):
    """Hand-built errors (exact in fp32) and embeddings against the paper's formulas in ``math``."""
    errors_w, errors_l = [0.25, 1.0, 2.25], [1.5625, 0.5625, 1.0]
    refs_w, refs_l = [0.75, 1.0, 1.5], [1.0, 0.25, 0.5]
    win = [[1.0, 0.5, 0.0, -0.5], [0.0, 1.0, 1.0, 0.0], [-1.0, 0.25, 0.5, 1.0]]
    lose = [[0.75, 0.5, -0.25, -0.5], [0.5, 1.0, 0.5, 0.25], [-0.5, -0.25, 1.0, 1.0]]
    tau, beta, lam = 0.25, 3.0 if kind == "orrpo" else 2.0, 0.5
    want, gw, gl = _closed_form_rpo(kind, errors_w, errors_l, refs_w, refs_l, win, lose, tau, beta, lam, inside)
    d = 8
    c = [math.sqrt(e) for e in errors_w + errors_l]
    model_pred = torch.tensor(c, device=device)[:, None].expand(-1, d).contiguous().requires_grad_(True)
    target = torch.zeros(6, d, device=device)
    kw = dict(win_emb=torch.tensor(win, device=device), lose_emb=torch.tensor(lose, device=device), tau=tau,
              beta=beta, weight_inside=inside, backend=backend)  # fmt: skip
    if kind == "orrpo":
        got = fastpref.orpo_loss(model_pred, target, lambda_orpo=lam, **kw)
    else:
        got = fastpref.rpo_loss(model_pred, None, target, ref_err=torch.tensor(refs_w + refs_l, device=device), **kw)
    got.backward()
    assert abs(got.item() - want) <= 1e-5 * abs(want) + 1e-7, (got.item(), want)
    expect = torch.tensor([g * 2 * ck / d for g, ck in zip(gw + gl, c)], dtype=torch.float64)
    torch.testing.assert_close(model_pred.grad[:, 0].double().cpu(), expect, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extreme_margins_are_finite(backend, device):
    model_pred, ref_pred, target, _ = make_pairs(6, (4,), torch.float32, device)
    win, lose = embeddings(6, 8, device)
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.rpo_loss(m, ref_pred, target, win_emb=win, lose_emb=lose, beta=1e9, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(m.grad).all()


def test_stats_are_the_diagonal_pairs(device):
    model_pred, ref_pred, target, beta = make_pairs(5, (3, 4), torch.float32, device)
    win, lose = embeddings(5, 8, device)
    _, stats = fastpref.rpo_loss(model_pred, ref_pred, target, win_emb=win, lose_emb=lose, beta=beta,
                                 return_stats=True, backend="triton")  # fmt: skip
    _, dpo_stats = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta, return_stats=True, backend="torch")
    torch.testing.assert_close(stats.margin, dpo_stats.margin, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.model_err_lose, dpo_stats.model_err_lose, rtol=1e-5, atol=1e-6)


def test_weights_carry_no_gradient(device):
    model_pred, ref_pred, target, beta = make_pairs(3, (4,), torch.float32, device)
    w = torch.rand(3, 3, device=device, requires_grad=True)
    fastpref.rpo_loss(model_pred.requires_grad_(True), ref_pred, target, weights=w, beta=beta).backward()
    assert w.grad is None


# ---- bad input -------------------------------------------------------------------------------------

_g = torch.Generator().manual_seed(0)
M, R, T = (torch.randn(6, 2, 3, generator=_g) for _ in range(3))
E = torch.randn(3, 8, generator=_g)

BAD_CALLS = [
    ("neither weights nor emb", dict(), TypeError, "weights"),
    ("both", dict(weights=torch.ones(3, 3), win_emb=E, lose_emb=E), TypeError, "weights"),
    ("one embedding", dict(win_emb=E), TypeError, "lose_emb"),
    ("weights shape", dict(weights=torch.ones(3, 4)), ValueError, "weights"),
    ("weights dtype", dict(weights=torch.ones(3, 3, dtype=torch.long)), TypeError, "weights"),
    ("weights device", dict(weights=torch.ones(3, 3, device="meta")), ValueError, "weights"),
    ("emb rows", dict(win_emb=E[:2], lose_emb=E), ValueError, "win_emb"),
    ("emb width", dict(win_emb=E, lose_emb=E[:, :5]), ValueError, "width"),
    ("emb 1-d", dict(win_emb=E[0], lose_emb=E), ValueError, "win_emb"),
    ("emb int", dict(win_emb=E.long(), lose_emb=E), TypeError, "win_emb"),
    ("tau", dict(win_emb=E, lose_emb=E, tau=0.0), ValueError, "tau"),
    ("beta", dict(win_emb=E, lose_emb=E, beta=-1.0), ValueError, "beta"),
    ("weight_inside", dict(win_emb=E, lose_emb=E, weight_inside=1), TypeError, "weight_inside"),
    ("reduction", dict(win_emb=E, lose_emb=E, reduction="avg"), ValueError, "reduction"),
    ("group without dist", dict(win_emb=E, lose_emb=E, group=object()), ValueError, "group"),
    ("C++ backend", dict(win_emb=E, lose_emb=E, backend="cpu"), ValueError, "backend"),
]  # fmt: skip


@pytest.mark.parametrize("desc,kwargs,exc,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clearly(desc, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        fastpref.rpo_loss(M, R, T, **kwargs)


def test_bad_clip_pair_weights_input():
    with pytest.raises(ValueError, match="width"):
        fastpref.clip_pair_weights(E, E[:, :3], tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        fastpref.clip_pair_weights(E, E, tau=-0.1)


# ---- the open_clip helper ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()  # randomly initialised, pretrained=None: nothing downloads


def test_clip_embeddings(tiny_clip, device):
    from fastpref import clip

    g = torch.Generator().manual_seed(0)
    win_px, lose_px = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    prompts = ["a red cube", "a blue sphere on grass", "two cats"]
    win, lose = clip.rpo_embeddings(tiny_clip, win_px, lose_px, prompts)
    assert win.shape == lose.shape == (3, 32) and win.dtype == torch.float32 and not win.requires_grad
    torch.testing.assert_close(win.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(win, clip.pair_embeddings(tiny_clip, win_px, prompts), rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # the default combiner: the normalised mean of the normalised embeddings
        img = torch.nn.functional.normalize(tiny_clip.encode_image(win_px), dim=-1)
        txt = torch.nn.functional.normalize(tiny_clip.encode_text(
            __import__("open_clip").tokenize(prompts, context_length=16)), dim=-1)  # fmt: skip
    torch.testing.assert_close(win, torch.nn.functional.normalize((img + txt) / 2, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip.pair_embeddings(tiny_clip, win_px, prompts, combiner="image"), img,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    custom = clip.pair_embeddings(tiny_clip, win_px, prompts, combiner=lambda i, t: 3 * i - t)
    torch.testing.assert_close(custom, torch.nn.functional.normalize(3 * img - txt, dim=-1), rtol=1e-5, atol=1e-6)

    # straight into the loss
    model_pred, ref_pred, target, beta = make_pairs(3, (4, 4), torch.float32, "cpu")
    loss = fastpref.rpo_loss(model_pred, ref_pred, target, win_emb=win, lose_emb=lose, beta=beta)
    assert torch.isfinite(loss)

    with pytest.raises(ValueError, match="combiner"):
        clip.pair_embeddings(tiny_clip, win_px, prompts, combiner="max")
    with pytest.raises(ValueError, match="prompts"):
        clip.rpo_embeddings(tiny_clip, win_px, lose_px, prompts[:2])
    with pytest.raises(TypeError, match="prompts"):
        clip.pair_embeddings(tiny_clip, win_px, "a red cube")


# ---- global batch across ranks -------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_batch_across_two_gloo_processes(tmp_path):
    """2 processes × 3 pairs, both backends: each rank's loss share adds up to the single-process
    loss of the 6 pairs, and each rank's gradient w.r.t. its model_pred equals the single-process
    gradient of the global loss."""
    world, m = 2, 3
    model_pred, ref_pred, target, beta = make_pairs(world * m, (3, 5), torch.float32, "cpu", seed=11)
    win, lose = embeddings(world * m, 16, "cpu", seed=11)
    torch.save(dict(model_pred=model_pred, ref_pred=ref_pred, target=target, win=win, lose=lose, beta=beta, m=m),
               tmp_path / "inputs.pt")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "_rpo_dist_worker.py"), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]  # fmt: skip
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    b = world * m
    for backend in ("torch", "triton"):
        mp = model_pred.clone().requires_grad_(True)
        loss = fastpref.rpo_loss(mp, ref_pred, target, win_emb=win, lose_emb=lose, beta=beta, backend=backend)
        loss.backward()
        shares = [torch.load(tmp_path / f"rank{r}_{backend}.pt") for r in range(world)]
        torch.testing.assert_close(sum(s["loss"] for s in shares), loss.detach(), rtol=1e-6, atol=1e-7)
        for r, s in enumerate(shares):
            rows = torch.cat([torch.arange(r * m, (r + 1) * m), b + torch.arange(r * m, (r + 1) * m)])
            torch.testing.assert_close(s["grad"], mp.grad[rows], rtol=1e-5, atol=1e-9, msg=f"{backend} rank {r}")
