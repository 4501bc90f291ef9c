"""MaPO, ORPO, KTO and DRO: the fused kernel family against the reference (fastpref/reference.py).

Same matrix as tests/test_pair_loss.py: fresh random inputs, dtypes, odd shapes, layouts, reductions
with upstream weights, extreme values, NaN, gradcheck, plus each loss's own property (MaPO's f at 0,
ORPO's sign, KTO's odd N and detached reference point, DRO's margin).
"""

import math

import pytest
import torch
from _pairs import ATOL, DTYPES, assert_within_rule, make_pairs

import fastpref
from fastpref import reference

LOSSES = ("mapo", "orpo", "dro", "kto")
EPS32 = torch.finfo(torch.float32).eps


def _labels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    y[0], y[-1] = 1, 0 if n > 1 else 1  # both classes present
    return y


def params_for(loss, model_pred, ref_pred, target, ref_err=None, labels=None):
    """Loss parameters that put the margins at O(1) on these inputs (as make_pairs does for β)."""
    em = reference.pair_errors(model_pred.double(), target.double())
    if loss == "mapo":
        mw, ml = em.chunk(2)
        gap = (reference.mapo_f(mw, 0.5) - reference.mapo_f(ml, 0.5)).abs().max().item()
        return dict(beta=0.7, snr_value=0.5, num_train_timesteps=3.0 / max(gap, 1e-6))
    if loss == "orpo":
        return dict(beta=2.0, lambda_orpo=0.5)
    er = ref_err.double() if ref_err is not None else reference.pair_errors(ref_pred.double(), target.double())
    if loss == "dro":
        # a margin m ≥ 0 as far as possible from every kink d_i + m = 0, so that some pairs are
        # active and rounding cannot flip the hinge
        kinks = sorted((-reference.margin(em, er, 2.0)).neg().tolist())
        cands = [0.0, 2 * max(kinks) + 1e-3] + [0.5 * (a + b) for a, b in zip(kinks, kinks[1:])]
        best = max((c for c in cands if c >= 0), key=lambda c: min(abs(c - k) for k in kinks))
        return dict(margin=best)
    g = er - em
    spread = (g - g.mean()).abs().max().item()
    return dict(beta=3.0 / max(spread, 1e-6), lambda_desirable=1.0, lambda_undesirable=1.5)


def call(loss, model_pred, ref_pred, target, *, ref_err=None, labels=None, backend="triton", **kw):
    if loss == "mapo":
        return fastpref.mapo_loss(model_pred, target, backend=backend, **kw)
    if loss == "orpo":
        return fastpref.orpo_loss(model_pred, target, backend=backend, **kw)
    if loss == "dro":
        return fastpref.dro_loss(model_pred, ref_pred, target, ref_err=ref_err, backend=backend, **kw)
    return fastpref.kto_loss(model_pred, ref_pred, target, labels, ref_err=ref_err, backend=backend, **kw)


def loss_of_errors(loss, model_err, ref_err, labels, p, reduction):
    """The reference loss as a function of the errors, in whatever dtype they are."""
    if loss == "mapo":
        losses, _ = reference.mapo(model_err, p["beta"], p["snr_value"], p["num_train_timesteps"])
    elif loss == "orpo":
        losses, _ = reference.orpo(model_err, p["beta"], p["lambda_orpo"])
    elif loss == "dro":
        losses, _ = reference.dro(model_err, ref_err, p["margin"])
    else:
        losses, _, _ = reference.kto(model_err, ref_err, labels, p["beta"], p["lambda_desirable"],
                                     p["lambda_undesirable"])  # fmt: skip
    return reference.reduce(losses, reduction)


def naive_errors(pred, target):
    """Errors computed by PyTorch in the input dtype, no upcast (the yardstick of the rule)."""
    n = pred.shape[0]
    t = target if target.shape[0] == n else torch.cat([target, target])
    return (pred - t).square().reshape(n, -1).mean(1)


def allowance(loss, em64, er64, labels, p, reduction, weights64, diff_max, numel):
    """First-order effect of the fp32 rounding of the errors (|δe| ≤ 4·eps32·|e|) on the loss and on
    the gradient, from the fp64 reference's own derivatives — the conditioning of the loss in the
    errors (T = 1000, β = 1000 multiply differences of O(1) errors), not a loosened tolerance."""

    def f(e):
        return (loss_of_errors(loss, e, er64, labels, p, reduction) * weights64).sum()

    e = em64.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(e), e)
    de = 4 * EPS32 * (em64.abs() + er64.abs())
    loss_allow = (g.abs() * de).sum().item()
    hess = torch.autograd.functional.hessian(f, em64.detach())
    grad_allow = ((hess.abs() @ de).max().item() + g.abs().max().item() * 4 * EPS32) * 2 * diff_max / numel
    return loss_allow, grad_allow


def check_against_reference(loss, model_pred, ref_pred, target, *, ref_err=None, labels=None, reduction="mean",
                            params=None):  # fmt: skip
    dtype = model_pred.dtype
    p = params or params_for(loss, model_pred, ref_pred, target, ref_err, labels)
    uses_ref = loss in ("dro", "kto")
    r_in = ref_pred if uses_ref and ref_err is None else None

    m = model_pred.detach().clone().requires_grad_(True)
    out = call(loss, m, r_in, target, ref_err=ref_err, labels=labels, reduction=reduction, **p)
    weights = torch.rand(out.shape, dtype=torch.float32, device=out.device) + 0.5
    (out * weights).sum().backward()

    m64 = model_pred.detach().double().requires_grad_(True)
    em64 = reference.pair_errors(m64, target.double())
    if not uses_ref:
        er64 = torch.zeros_like(em64)
    elif ref_err is not None:
        er64 = ref_err.double()
    else:
        er64 = reference.pair_errors(ref_pred.double(), target.double())
    out64 = loss_of_errors(loss, em64, er64, labels, p, reduction)
    (out64 * weights.double()).sum().backward()

    ml = model_pred.detach().clone().requires_grad_(True)
    em_lo = naive_errors(ml, target)
    if not uses_ref:
        er_lo = torch.zeros_like(em_lo)
    elif ref_err is not None:
        er_lo = ref_err.to(dtype)
    else:
        er_lo = naive_errors(ref_pred, target)
    naive = loss_of_errors(loss, em_lo, er_lo, labels, p, reduction)
    (naive * weights.to(naive.dtype)).sum().backward()

    t64 = target.double() if target.shape[0] == model_pred.shape[0] else torch.cat([target, target]).double()
    loss_allow, grad_allow = allowance(loss, em64.detach(), er64, labels, p, reduction, weights.double(),
                                       (m64 - t64).abs().max().item(), model_pred[0].numel())  # fmt: skip
    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert m.grad.dtype == dtype and m.grad.shape == model_pred.shape
    assert_within_rule(out, out64, naive, dtype, f"{loss} loss", loss_allow)
    assert_within_rule(m.grad, m64.grad, ml.grad, dtype, f"{loss} grad", grad_allow)


def inputs(loss, num_pairs, sample_shape, dtype, device, shared=False, seed=None):
    model_pred, ref_pred, target, _ = make_pairs(num_pairs, sample_shape, dtype, device, shared=shared, seed=seed)
    labels = None
    if loss == "kto":  # unpaired: an odd number of rows
        n = 2 * num_pairs - 1 if num_pairs > 1 else 1
        model_pred, ref_pred, target = model_pred[:n], ref_pred[:n], target[:n]
        labels = _labels(n).to(device)
    return model_pred, ref_pred, target, labels


SHAPES = [(1, (3, 5, 7)), (3, (4, 13, 17)), (2, (16411,))]  # one pair (one kto row); odd/prime; > one block


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES, ids=["one_pair", "odd", "multi_block"])
def test_matches_reference(loss, dtype, num_pairs, sample_shape, device):
    model_pred, ref_pred, target, labels = inputs(loss, num_pairs, sample_shape, dtype, device)
    check_against_reference(loss, model_pred, ref_pred, target, labels=labels)


LAYOUTS = ["rowstride", "transposed", "shared", "ref_err"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_and_input_forms(loss, case, device):
    if case == "shared" and loss == "kto":
        pytest.skip("kto is unpaired: no pair shares a target")
    if case == "ref_err" and loss in ("mapo", "orpo"):
        pytest.skip("reference-free")
    model_pred, ref_pred, target, labels = inputs(loss, 3, (2, 7, 11), torch.bfloat16, device, shared=case == "shared")
    ref_err = None
    n = model_pred.shape[0]
    if case == "rowstride":
        wide = torch.zeros(n, model_pred[0].numel() + 5, dtype=model_pred.dtype, device=device)
        wide[:, : model_pred[0].numel()] = model_pred.reshape(n, -1)
        model_pred = wide[:, : model_pred[0].numel()].view(model_pred.shape)
        assert not model_pred.is_contiguous()
    if case == "transposed":
        model_pred, ref_pred, target = (x.transpose(-1, -2).contiguous().transpose(-1, -2)
                                        for x in (model_pred, ref_pred, target))  # fmt: skip
        assert not model_pred.is_contiguous()
    if case == "ref_err":
        ref_err = reference.pair_errors(ref_pred, target)
    check_against_reference(loss, model_pred, ref_pred, target, ref_err=ref_err, labels=labels)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_upstream_weights(loss, reduction, device):
    model_pred, ref_pred, target, labels = inputs(loss, 5, (3, 9), torch.float32, device)
    check_against_reference(loss, model_pred, ref_pred, target, labels=labels, reduction=reduction)


@pytest.mark.parametrize("loss", LOSSES)
def test_split_reduction_over_samples(loss, device):
    """The S-split path (several programs per pair, used on GPUs when 2B is small)."""
    from fastpref.ops.family import kernel_scalars
    from fastpref.ops.library import triton_pair_loss  # the op the public losses call

    model_pred, ref_pred, target, labels = inputs(loss, 3, (3, 7, 11), torch.float32, device)
    p = params_for(loss, model_pred, ref_pred, target, labels=labels)
    beta, c0, c1 = kernel_scalars(loss, **p)
    r = ref_pred if loss in ("dro", "kto") else None
    outs = []
    for splits in (1, 3):
        m = model_pred.clone().requires_grad_(True)
        out, _, _ = triton_pair_loss(loss, m, r, target, None, beta=beta, c0=c0, c1=c1, labels=labels,
                                     reduction="mean", num_splits=splits)  # fmt: skip
        out.backward()
        outs.append((out.detach(), m.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_backend_is_the_reference(loss, device):
    model_pred, ref_pred, target, labels = inputs(loss, 3, (4, 5), torch.float64, device)
    p = params_for(loss, model_pred, ref_pred, target, labels=labels)
    got = call(loss, model_pred, ref_pred, target, labels=labels, backend="torch", **p)
    em = reference.pair_errors(model_pred, target)
    er = reference.pair_errors(ref_pred, target) if loss in ("dro", "kto") else torch.zeros_like(em)
    assert torch.equal(got, loss_of_errors(loss, em, er, labels, p, "mean"))


# ---- each loss's own properties ------------------------------------------------------------------


def _preds_with_errors(errors, device, d=8):
    """model_pred = target + c_k with c_k² = e_k: sample k has error exactly e_k (up to fp32)."""
    e = torch.as_tensor(errors, dtype=torch.float64)
    target = torch.zeros(e.numel(), d, dtype=torch.float64)
    model_pred = e.sqrt()[:, None].expand(-1, d).clone()
    return model_pred.float().to(device), target.float().to(device)


def test_mapo_f_is_continuous_at_zero():
    x = torch.tensor([0.0, 1e-12, 1e-6, 1e-5, 1e-4, 2e-4, 1e-2, 1.0, 10.0, 200.0, 1e4], dtype=torch.float64)
    f = reference.mapo_f(x, 0.5)
    y = 0.5 * x
    exact = torch.where(y == 0, torch.ones_like(y), y / torch.expm1(y))
    torch.testing.assert_close(f, exact, rtol=1e-12, atol=1e-300)
    assert f[0].item() == 1.0 and torch.isfinite(f).all()
    xg = x[:7].clone().requires_grad_(True)
    (df,) = torch.autograd.grad(reference.mapo_f(xg, 0.5).sum(), xg)
    # f'(x) = s·φ'(sx), φ'(0) = −½: no jump across the series/closed-form switch at |y| = 1e-4
    assert abs(df[0].item() + 0.25) < 1e-12 and (df[:6] + 0.25).abs().max().item() < 1e-4


def test_mapo_kernel_near_zero_and_large_errors(device):
    """The kernel's f and f' across its three regimes (series, Kahan form, y·e^{−y}) against fp64."""
    errors = [0.0, 1e-7, 1e-3, 0.19, 0.21, 0.5, 3.0, 50.0, 119.0, 121.0, 300.0, 1e4]
    b = len(errors) // 2
    model_pred, target = _preds_with_errors(errors, device)
    kw = dict(beta=0.3, snr_value=0.5, num_train_timesteps=10.0, reduction="none")
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.mapo_loss(m, target, backend="triton", **kw)
    out.sum().backward()
    m64 = model_pred.double().requires_grad_(True)
    out64 = fastpref.mapo_loss(m64, target.double(), backend="torch", **kw)
    out64.sum().backward()
    assert out.shape == (b,) and torch.isfinite(out).all() and torch.isfinite(m.grad).all()
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-4, atol=1e-6)


def test_orpo_gradient_favours_the_winner(device):
    """A gradient step on the ORPO loss raises the loser's error (only the preference term can) and
    lowers the winner's relative to the loser's; the diffusers script's logσ(e_w − e_l) does the
    opposite to the loser."""
    model_pred, ref_pred, target, _ = make_pairs(4, (6, 5), torch.float64, device, seed=3)

    def step(loss_fn, lr=1e-3):
        m = model_pred.clone().requires_grad_(True)
        loss_fn(m).backward()
        before = reference.pair_errors(model_pred, target).chunk(2)
        after = reference.pair_errors(model_pred - lr * m.grad, target).chunk(2)
        return after[0] - before[0], after[1] - before[1]

    for backend in ("triton", "torch"):
        dw, dl = step(lambda m: fastpref.orpo_loss(m, target, beta=2.0, lambda_orpo=5.0, backend=backend))
        assert (dl > 0).all() and (dw - dl < 0).all(), backend

    def diffusers_orpo(m, beta_orpo=5.0):  # examples/research_projects/diffusion_orpo, transcribed
        model_losses = (m - target).pow(2).mean(dim=[1, 2])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        log_odds = model_losses_w - model_losses_l
        ratio = torch.nn.functional.logsigmoid(log_odds)
        return model_losses_w.mean() - (beta_orpo * ratio).mean()

    dw, dl = step(diffusers_orpo)
    assert (dl < 0).all()


def test_orpo_default_beta_is_the_summed_error_likelihood(device):
    """beta=None: log p = −½·‖ε − ε_θ‖² on summed errors (Diffusion-RPO paper, App. C), i.e. β = D."""
    model_pred, _, target, _ = make_pairs(2, (3, 4), torch.float64, device)
    d = model_pred[0].numel()
    got = fastpref.orpo_loss(model_pred, target, backend="torch")
    sq = (model_pred - target).square().flatten(1)
    mse_sum_w, mse_sum_l = sq.sum(1).chunk(2)

    def log_odds(s):  # log p − log(1 − p), log p = −½·s
        return -0.5 * s - torch.log(-torch.expm1(-0.5 * s))

    expected = (sq.mean(1).chunk(2)[0]
                - 0.1 * torch.nn.functional.logsigmoid(log_odds(mse_sum_w) - log_odds(mse_sum_l))).mean()  # fmt: skip
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, fastpref.orpo_loss(model_pred, target, beta=float(d), backend="torch"))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_kto_any_number_of_rows_and_detached_reference_point(n, device):
    """KTO transcribed with z detached; N odd or even; kernel and reference agree with it."""
    model_pred, ref_pred, target, _ = make_pairs(4, (3, 7), torch.float64, device, seed=n)
    model_pred, ref_pred, target = model_pred[:n], ref_pred[:n], target[:n]
    labels = _labels(n).to(device)
    beta = 50.0
    m_t = model_pred.clone().requires_grad_(True)
    e_m = (m_t - target).pow(2).mean(dim=[1, 2])
    e_r = (ref_pred - target).pow(2).mean(dim=[1, 2])
    g = e_r - e_m
    z = g.mean().clamp(min=0).detach()
    x = beta * (g - z)
    expected = torch.where(labels.bool(), 1.0 - torch.sigmoid(x), 2.0 * (1.0 - torch.sigmoid(-x))).mean()
    expected.backward()
    for backend in ("triton", "torch"):
        m = model_pred.clone().requires_grad_(True)
        got, stats = fastpref.kto_loss(m, ref_pred, target, labels, beta=beta, lambda_undesirable=2.0,
                                       return_stats=True, backend=backend)  # fmt: skip
        got.backward()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.grad, m_t.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(stats.reference_point.double(), z, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.implicit_reward.double(), x.detach(), rtol=1e-4, atol=1e-4)
        assert stats.desirable.tolist() == labels.bool().tolist()
        assert set(stats.scalars()) >= {"reward_desirable", "reward_undesirable", "reference_point"}


def test_dro_margin_and_hinge(device):
    """ℓ = relu(d + m): zero once the expert beats the online sample by m, slope 1 before."""
    beta = 2.0
    us = torch.tensor([-0.01, -0.001, 0.0005, 0.0015, 0.01], dtype=torch.float64)  # u = −d
    b = us.numel()
    target = torch.zeros(b, 4, device=device)
    model_pred = torch.full((2 * b, 4), 0.5, device=device)
    ref_err = torch.cat([2 * us / beta + 1.0, torch.ones(b, dtype=torch.float64)]).to(device)
    for backend in ("triton", "torch"):
        m = model_pred.clone().requires_grad_(True)
        out, stats = fastpref.dro_loss(m, None, target, ref_err=ref_err, margin=0.001, reduction="none",
                                       return_stats=True, backend=backend)  # fmt: skip
        out.sum().backward()
        torch.testing.assert_close(out.double().cpu(), torch.relu(0.001 - us), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.margin.double().cpu(), us, rtol=1e-4, atol=1e-7)
        active = (us < 0.001).to(device)
        # ∂ℓ/∂pred_w = 1[active]·2(pred − target)/D = 1[active]·0.25
        torch.testing.assert_close(m.grad[:b, 0].double(), 0.25 * active.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_values_are_finite(loss, device):
    """Errors from 0 to 1e4 and β from the papers' scales up: finite loss and gradient."""
    errors = [0.0, 1e-8, 1e-3, 1.0, 1e2, 1e4]
    model_pred, target = _preds_with_errors(errors, device)
    ref_err = torch.tensor([1e4, 1e2, 1.0, 1e-3, 1e-8, 0.0], device=device)
    labels = torch.tensor([1, 0, 1, 0, 1, 0], device=device)
    kw = {"mapo": dict(num_train_timesteps=1e6), "orpo": dict(beta=1e5, lambda_orpo=1.0), "dro": dict(margin=0.5),
          "kto": dict(beta=1e6)}[loss]  # fmt: skip
    for backend in ("triton", "torch"):
        m = model_pred.clone().requires_grad_(True)
        out = call(loss, m, None, target, ref_err=ref_err, labels=labels, backend=backend, reduction="none", **kw)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(m.grad).all(), (backend, out, m.grad)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("where", ["model_pred", "target", "ref_pred"])
def test_nan_is_never_hidden(loss, where, device):
    if where == "ref_pred" and loss in ("mapo", "orpo"):
        pytest.skip("reference-free")
    model_pred, ref_pred, target, labels = inputs(loss, 2, (3, 4), torch.float32, device)
    tensors = {"model_pred": model_pred.clone(), "ref_pred": ref_pred.clone(), "target": target.clone()}
    tensors[where].view(-1)[1] = float("nan")
    p = params_for(loss, model_pred, ref_pred, target, labels=labels)
    out = call(loss, tensors["model_pred"], tensors["ref_pred"], tensors["target"], labels=labels,
               reduction="none", **p)  # fmt: skip
    assert torch.isnan(out).any().item(), f"NaN in {where} was hidden: {out}"


@pytest.mark.parametrize("loss", ["mapo", "orpo"])
def test_reference_free_stats(loss, device):
    model_pred, _, target, _ = make_pairs(3, (4, 6), torch.float32, device)
    p = params_for(loss, model_pred, None, target)
    for backend in ("triton", "torch"):
        _, stats = call(loss, model_pred, None, target, return_stats=True, backend=backend, **p)
        torch.testing.assert_close(stats.reward_win - stats.reward_lose, stats.margin, rtol=1e-4, atol=1e-4)
        assert (stats.ref_err_win == 0).all() and not stats.margin.requires_grad
        em = reference.pair_errors(model_pred, target)
        torch.testing.assert_close(stats.model_err_win, em.chunk(2)[0], rtol=1e-5, atol=1e-6)


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    model_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    fns = {
        "mapo": lambda m: fastpref.mapo_loss(m, target, num_train_timesteps=5.0, reduction="none", backend="torch"),
        "orpo": lambda m: fastpref.orpo_loss(m, target, beta=2.0, reduction="none", backend="torch"),
        "dro": lambda m: fastpref.dro_loss(m, ref_pred, target, margin=0.05, reduction="none", backend="torch"),
        "kto": lambda m: fastpref.kto_loss(m[:5], ref_pred[:5], target[:5], labels[:5], beta=2.0, reduction="none",
                                           backend="torch"),
    }  # fmt: skip
    for name, f in fns.items():
        assert torch.autograd.gradcheck(f, (model_pred,)), name


def test_two_runs_bit_identical(device):
    model_pred, ref_pred, target, labels = inputs("kto", 4, (5, 9), torch.bfloat16, device)
    results = []
    for _ in range(2):
        m = model_pred.clone().requires_grad_(True)
        out = fastpref.kto_loss(m, ref_pred, target, labels, beta=100.0, backend="triton")
        out.backward()
        results.append((out.detach(), m.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---- bad input -------------------------------------------------------------------------------------

_g = torch.Generator().manual_seed(0)
M, R, T = (torch.randn(4, 3, 4, generator=_g) for _ in range(3))
Y = torch.tensor([1, 0, 1, 1])

BAD_CALLS = [
    ("mapo odd batch", lambda: fastpref.mapo_loss(M[:3], T[:3]), ValueError, "model_pred"),
    ("mapo target shape", lambda: fastpref.mapo_loss(M, T[:, :2]), ValueError, "target"),
    ("mapo beta", lambda: fastpref.mapo_loss(M, T, beta=0.0), ValueError, "beta"),
    ("mapo snr", lambda: fastpref.mapo_loss(M, T, snr_value=-1.0), ValueError, "snr_value"),
    ("mapo timesteps", lambda: fastpref.mapo_loss(M, T, num_train_timesteps="1000"), TypeError, "num_train_timesteps"),
    ("mapo reduction", lambda: fastpref.mapo_loss(M, T, reduction="avg"), ValueError, "reduction"),
    ("mapo backend", lambda: fastpref.mapo_loss(M, T, backend="tpu"), ValueError, "backend"),
    ("orpo lambda", lambda: fastpref.orpo_loss(M, T, lambda_orpo=-1.0), ValueError, "lambda_orpo"),
    ("orpo beta", lambda: fastpref.orpo_loss(M, T, beta=float("nan")), ValueError, "beta"),
    ("orpo integer", lambda: fastpref.orpo_loss(M.long(), T), TypeError, "model_pred"),
    ("orpo group without weights", lambda: fastpref.orpo_loss(M, T, group=object()), ValueError, "group"),
    ("dro no ref", lambda: fastpref.dro_loss(M, None, T), TypeError, "ref_pred"),
    ("dro margin", lambda: fastpref.dro_loss(M, R, T, margin=-0.1), ValueError, "margin"),
    ("dro ref grad", lambda: fastpref.dro_loss(M, R.clone().requires_grad_(True), T), ValueError, "ref_pred"),
    ("kto labels shape", lambda: fastpref.kto_loss(M, R, T, Y[:3]), ValueError, "labels"),
    ("kto labels values", lambda: fastpref.kto_loss(M, R, T, torch.tensor([0, 1, 2, 1])), ValueError, "labels"),
    ("kto labels list", lambda: fastpref.kto_loss(M, R, T, [1, 0, 1, 1]), TypeError, "labels"),
    ("kto labels device", lambda: fastpref.kto_loss(M, R, T, Y.to("meta")), ValueError, "labels"),
    ("kto target shape", lambda: fastpref.kto_loss(M, R, T[:2], Y), ValueError, "target"),
    ("kto ref shape", lambda: fastpref.kto_loss(M, R[:3], T, Y), ValueError, "ref_pred"),
    ("kto both refs", lambda: fastpref.kto_loss(M, R, T, Y, ref_err=torch.ones(4)), TypeError, "ref_err"),
    ("kto ref_err shape", lambda: fastpref.kto_loss(M, None, T, Y, ref_err=torch.ones(3)), ValueError, "ref_err"),
    ("kto lambda", lambda: fastpref.kto_loss(M, R, T, Y, lambda_desirable=-1.0), ValueError, "lambda_desirable"),
    ("kto beta", lambda: fastpref.kto_loss(M, R, T, Y, beta=0), ValueError, "beta"),
    ("kto empty", lambda: fastpref.kto_loss(M[:0], R[:0], T[:0], Y[:0]), ValueError, "model_pred"),
    ("kto target grad", lambda: fastpref.kto_loss(M, R, T.clone().requires_grad_(True), Y), ValueError, "target"),
]  # fmt: skip


@pytest.mark.parametrize("desc,fn,exc,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clearly(desc, fn, exc, text):
    with pytest.raises(exc, match=text):
        fn()


def test_atol_table_covers_the_dtypes():
    assert all(dt in ATOL for dt in DTYPES) and math.isfinite(EPS32)
