"""Every loss of the fused kernel family on every backend: sigmoid, hinge, IPO (``dpo_loss``), DMPO,
DRO, MaPO, ORPO and KTO × ``torch`` (the reference), ``triton`` (the interpreter on a CPU) and ``cpu``
(the C++ op; no kto).

Two kinds of check:

* **independent** — each loss against a transcription of a public trainer's lines or a closed form
  written here from the paper, on hand-built inputs; none goes through ``fastpref/reference.py``, so a
  wrong reference fails them too;
* **kernel vs reference** — seeded random inputs (odd sizes, one pair, more than one block/chunk,
  bf16/fp16/fp32/fp64, strided and shared layouts, reductions with upstream weights), loss and
  gradient within the fp32-accumulation bound of ``_pairs.check_against_reference``.

Diffusion-RPO/ORRPO (the M×N weighted matrix) is in test_rpo.py; what only one backend can get wrong
is in test_triton.py and test_cpp_backend.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _pairs import (
    CPP_LOSSES,
    DTYPES,
    FAMILY,
    REF_FREE,
    UNPAIRED,
    call,
    check_against_reference,
    inputs,
    labels_for,
    losses_of_errors,
    make_pairs,
    params_for,
)

import fastpref
from fastpref import reference
from fastpref.ops import extension

BACKENDS = ("torch", "triton", "cpu")


def skip_unsupported(loss, backend):
    if backend == "cpu":
        if loss not in CPP_LOSSES:
            pytest.skip(f"{loss} has no C++ backend (test_cpp_backend.py checks that it says so)")
        if not extension.available():
            pytest.skip(f"the C++ extension could not be built: {extension.unavailable_reason()}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ---- independent checks ----------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _preds_with_errors(errors, d=8, device="cpu"):
    """model_pred = target + c_k with c_k² = e_k (dyadic c_k: every error exact in fp32), target 0."""
    c = torch.tensor([math.sqrt(e) for e in errors], dtype=torch.float64)
    assert torch.equal(c.square(), torch.tensor(errors, dtype=torch.float64)), "pick errors with dyadic roots"
    model_pred = c[:, None].expand(-1, d).contiguous().float().to(device)
    return model_pred, torch.zeros_like(model_pred), c


def _check_closed_form(backend, model_pred, target, out, grad_out_of_e, c, expected, dl_de, reduction):
    """``out`` (from ``backend``) equals ``expected``; the gradient w.r.t. model_pred row k is
    ∂L/∂e_k · 2c_k/D (every element of a row equals c_k, target 0)."""
    d = model_pred.shape[1]
    torch.testing.assert_close(out.double().cpu(), torch.tensor(expected, dtype=torch.float64).reshape(out.shape),
                               rtol=1e-5, atol=1e-7, msg=f"{backend}: value")  # fmt: skip
    want = torch.tensor([g * 2 * ck / d for g, ck in zip(dl_de, c.tolist())], dtype=torch.float64)
    got = grad_out_of_e.double().cpu()
    assert (got == got[:, :1]).all()
    torch.testing.assert_close(got[:, 0], want, rtol=1e-4, atol=1e-9)  # 1 − σ(t) in fp32 at |t| ≈ 6


# The public trainers' loss lines, transcribed with their own variable names (torch, fp64, autograd).


def diffusers_dpo(model_pred, ref_pred, target, beta_dpo, loss_type):
    """huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5):
    no ½ in the margin, so its ``beta_dpo`` is fastpref's β/2 (sigmoid, hinge); ``ipo`` reads
    ``args.beta`` (an attribute the script lacks), with the same β as fastpref's."""
    model_losses = torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = torch.nn.functional.mse_loss(ref_pred, target, reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        loss = -1 * torch.nn.functional.logsigmoid(beta_dpo * logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta_dpo * logits).mean()
    else:
        losses = (logits - 1 / (2 * beta_dpo)) ** 2
        loss = losses.mean()
    return loss


def salesforce_dpo(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO train.py: ``scale_term = -0.5 * args.beta_dpo``."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * torch.nn.functional.logsigmoid(inside_term).mean()


def mapo_compute_loss(model_pred, target, snr_value, num_train_timesteps, beta_mapo):
    """mapo-t2i/mapo train_with_mapo.py ``compute_loss``."""
    model_losses = torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l
    ) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = torch.nn.functional.logsigmoid(log_odds * num_train_timesteps)
    ratio_losses = beta_mapo * ratio
    return model_losses_w.mean() - ratio_losses.mean()


def _run(loss, backend, model_pred, *args, **kw):
    m = model_pred.detach().clone().requires_grad_(True)
    out = call(loss, m, *args, backend=backend, **kw)
    out.backward()
    return out.detach(), m.grad


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "mapo"])
def test_transcription_of_public_trainer(loss, backend, device):
    """The loss and its gradient equal the public trainer's lines (fp64 autograd on the same inputs;
    fp32 inputs, so the only difference is the backend's own fp32 rounding)."""
    skip_unsupported(loss, backend)
    model_pred, ref_pred, target, beta = make_pairs(4, (4, 6, 5), torch.float32, device)
    m64 = model_pred.double().requires_grad_(True)
    if loss == "mapo":
        kw = dict(beta=0.3, snr_value=0.5, num_train_timesteps=params_for("mapo", model_pred, None, target)
                  ["num_train_timesteps"])  # fmt: skip
        want = mapo_compute_loss(m64, target.double(), kw["snr_value"], kw["num_train_timesteps"], kw["beta"])
        got, grad = _run(loss, backend, model_pred, None, target, **kw)
    else:
        # β such that the hinge has pairs on both sides of its kink
        want = diffusers_dpo(m64, ref_pred.double(), target.double(), beta if loss == "ipo" else beta / 2, loss)
        got, grad = _run(loss, backend, model_pred, ref_pred, target, beta=beta)
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), m64.grad, rtol=1e-4, atol=1e-6 * m64.grad.abs().max().item())
    if loss == "sigmoid":  # the Salesforce line, with the ½: fastpref's β as is
        m64.grad = None
        salesforce_dpo(m64, ref_pred.double(), target.double(), beta).backward()
        torch.testing.assert_close(grad.double(), m64.grad, rtol=1e-4, atol=1e-6 * m64.grad.abs().max().item())


def test_hinge_transcription_has_both_sides_of_the_kink(device):
    """The seeded inputs of the hinge transcription put pairs on both sides of u = 1 at β/2 (else a
    hinge with the wrong kink would pass)."""
    model_pred, ref_pred, target, beta = make_pairs(4, (4, 6, 5), torch.float32, device)
    _, stats = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta, kind="hinge", return_stats=True,
                                 backend="torch")  # fmt: skip
    assert (stats.margin < 1).any() and (stats.margin > 1).any() and (stats.margin < 0).any(), stats.margin


# Hand-built pairs: (e_θ[w], e_θ[l]) with dyadic roots, and reference errors that set the margin.
E_MODEL_W = [0.25, 1.0, 2.25, 0.5625]
E_MODEL_L = [1.5625, 0.5625, 1.0, 0.5625]
E_REF_W = [0.75, 1.0, 1.5, 0.25]
E_REF_L = [1.0, 0.25, 0.5, 0.75]


def _dpo_family_case(device):
    model_pred, target, c = _preds_with_errors(E_MODEL_W + E_MODEL_L, device=device)
    ref_err = torch.tensor(E_REF_W + E_REF_L, device=device)
    d = [(mw - ml) - (rw - rl) for mw, ml, rw, rl in zip(E_MODEL_W, E_MODEL_L, E_REF_W, E_REF_L)]
    return model_pred, target, c, ref_err, d


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "dmpo"])
def test_closed_form_dpo_family(loss, backend, device):
    """ℓ(u) and ∂ℓ/∂e_θ from the papers' formulas evaluated with ``math``, u = −½β·d:

    sigmoid (Diffusion-DPO eq. 9) −log σ(u); hinge (SLiC) max(0, 1 − u); IPO (h − 1/(2β))², h = −d;
    DMPO (eq. 14) KL(Bern σ(u) ‖ Bern(1 − α)) = p·log(p/(1 − α)) + (1 − p)·log((1 − p)/α), p = σ(u),
    whose derivative is p(1 − p)·(u − log((1 − α)/α)) (d/du of the KL with log p − log(1 − p) = u)."""
    skip_unsupported(loss, backend)
    model_pred, target, c, ref_err, d = _dpo_family_case(device)
    beta, alpha = 2.0, 0.05
    us = [-0.5 * beta * x for x in d]
    assert min(us) < 0 < max(us) and any(u > 1 for u in us)  # both signs, both sides of the hinge
    values, dl_du = [], []
    for u in us:
        p = _sigmoid(u)
        if loss == "sigmoid":
            values.append(math.log1p(math.exp(-u)))
            dl_du.append(-(1 - p))
        elif loss == "hinge":
            values.append(max(0.0, 1 - u))
            dl_du.append(-1.0 if u < 1 else 0.0)
        elif loss == "ipo":
            h = 2 * u / beta
            values.append((h - 1 / (2 * beta)) ** 2)
            dl_du.append(2 * (h - 1 / (2 * beta)) * 2 / beta)
        else:
            values.append(p * math.log(p / (1 - alpha)) + (1 - p) * math.log((1 - p) / alpha))
            dl_du.append(p * (1 - p) * (u - math.log((1 - alpha) / alpha)))
    b = len(us)
    # reduction="sum" with grad 1: ∂L/∂e_θ[w_i] = ℓ'(u_i)·(−½β), ∂L/∂e_θ[l_i] = ℓ'(u_i)·(+½β)
    dl_de = [g * -0.5 * beta for g in dl_du] + [g * 0.5 * beta for g in dl_du]
    m = model_pred.clone().requires_grad_(True)
    kw = dict(beta=beta, alpha=alpha) if loss == "dmpo" else dict(beta=beta)
    out = call(loss, m, None, target, ref_err=ref_err, backend=backend, reduction="none", **kw)
    out.sum().backward()
    _check_closed_form(backend, model_pred, target, out, m.grad, c, values, dl_de, "none")
    assert out.shape == (b,)


def test_closed_form_dro(backend, device):
    """Diffusion-DRO (basiclab/DiffusionDRO): ℓ_i = max(0, d_i + m) with d_i = (e_θ − e_ref)[expert_i]
    − (e_θ − e_ref)[online_i]; slope +1 for the expert's error, −1 for the online sample's, 0 past m."""
    skip_unsupported("dro", backend)
    model_pred, target, c, ref_err, d = _dpo_family_case(device)
    margin = 0.375
    assert any(x + margin > 0 for x in d) and any(x + margin < 0 for x in d)
    values = [max(0.0, x + margin) for x in d]
    slope = [1.0 if x + margin > 0 else 0.0 for x in d]
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.dro_loss(m, None, target, ref_err=ref_err, margin=margin, reduction="none", backend=backend)
    out.sum().backward()
    _check_closed_form(backend, model_pred, target, out, m.grad, c, values, slope + [-s for s in slope], "none")


def test_closed_form_orpo(backend, device):
    """Diffusion-ORPO (Diffusion-RPO paper, App. C): log p = −½βe, odds = p/(1 − p),
    ℓ_i = e_w − λ·log σ(log odds(e_w) − log odds(e_l)); d log odds/de = −½β/(1 − p)."""
    skip_unsupported("orpo", backend)
    model_pred, target, c = _preds_with_errors(E_MODEL_W + E_MODEL_L, device=device)
    beta, lam = 3.0, 0.5

    def log_odds(e):
        p = math.exp(-0.5 * beta * e)
        return math.log(p / (1 - p)), -0.5 * beta / (1 - p)

    values, dw, dl = [], [], []
    for ew, el in zip(E_MODEL_W, E_MODEL_L):
        (lw, gw), (ll, gl) = log_odds(ew), log_odds(el)
        r = lw - ll
        values.append(ew - lam * math.log(_sigmoid(r)))
        s = lam * (1 - _sigmoid(r))  # −∂(λ·log σ(r))/∂r
        dw.append(1.0 - s * gw)
        dl.append(s * gl)
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.orpo_loss(m, target, beta=beta, lambda_orpo=lam, reduction="none", backend=backend)
    out.sum().backward()
    _check_closed_form(backend, model_pred, target, out, m.grad, c, values, dw + dl, "none")


def test_closed_form_mapo(backend, device):
    """MaPO (Hong et al. 2024, arXiv:2406.06424): f(e) = s·e/(e^{s·e} − 1), u = T·(f(e_w) − f(e_l)),
    ℓ_i = e_w − β·log σ(u); f'(e) = s·(e^y − 1 − y·e^y)/(e^y − 1)², y = s·e."""
    skip_unsupported("mapo", backend)
    model_pred, target, c = _preds_with_errors(E_MODEL_W + E_MODEL_L, device=device)
    beta, s, t = 0.5, 0.5, 4.0

    def f(e):
        y = s * e
        return y / math.expm1(y), s * (math.expm1(y) - y * math.exp(y)) / math.expm1(y) ** 2

    values, dw, dl = [], [], []
    for ew, el in zip(E_MODEL_W, E_MODEL_L):
        (fw, gw), (fl, gl) = f(ew), f(el)
        u = t * (fw - fl)
        values.append(ew - beta * math.log(_sigmoid(u)))
        g = beta * (1 - _sigmoid(u)) * t
        dw.append(1.0 - g * gw)
        dl.append(g * gl)
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.mapo_loss(m, target, beta=beta, snr_value=s, num_train_timesteps=t, reduction="none",
                             backend=backend)  # fmt: skip
    out.sum().backward()
    _check_closed_form(backend, model_pred, target, out, m.grad, c, values, dw + dl, "none")


def test_closed_form_kto(backend, device):
    """Diffusion-KTO (Li et al. 2024, arXiv:2404.04465) on mean errors: g_k = e_ref[k] − e_θ[k],
    z = max(0, mean_k g_k) without gradient, ℓ_k = λ_y·(1 − σ(±β(g_k − z))) (+ for desirable rows);
    ∂ℓ_k/∂e_θ[k] = ±λ_y·β·σ'(±β(g_k − z)). Odd N, and an N where z is clamped to 0."""
    skip_unsupported("kto", backend)
    for errors, refs, labels in (
        (E_MODEL_W + E_MODEL_L[:3], [1.0, 1.5, 2.25, 1.0, 2.25, 0.75, 1.5], [1, 0, 1, 1, 0, 0, 1]),  # z > 0
        ([2.25, 1.0, 1.5625], [0.25, 1.0, 1.0], [0, 1, 0]),  # mean g < 0: z = 0
    ):
        model_pred, target, c = _preds_with_errors(errors, device=device)
        beta, lam_d, lam_u = 3.0, 1.0, 1.5
        g = [r - e for e, r in zip(errors, refs)]
        z = max(0.0, sum(g) / len(g))
        assert (z > 0) == (len(errors) == 7)
        values, dl_de = [], []
        for gk, y in zip(g, labels):
            sign, lam = (1.0, lam_d) if y else (-1.0, lam_u)
            t = sign * beta * (gk - z)
            values.append(lam * (1 - _sigmoid(t)))
            dl_de.append(lam * _sigmoid(t) * (1 - _sigmoid(t)) * sign * beta)
        m = model_pred.clone().requires_grad_(True)
        out, stats = fastpref.kto_loss(m, None, target, torch.tensor(labels, device=device),
                                       ref_err=torch.tensor(refs, device=device), beta=beta, lambda_desirable=lam_d,
                                       lambda_undesirable=lam_u, reduction="none", return_stats=True,
                                       backend=backend)  # fmt: skip
        out.sum().backward()
        _check_closed_form(backend, model_pred, target, out, m.grad, c, values, dl_de, "none")
        assert abs(stats.reference_point.item() - z) <= 1e-6


def test_dmpo_minimum_is_at_the_log_odds_of_alpha(backend, device):
    """DMPO's ℓ(u) is 0 at u* = log((1−α)/α) and positive on either side (a KL divergence)."""
    skip_unsupported("dmpo", backend)
    alpha, beta = 0.01, 2.0
    u_star = math.log((1 - alpha) / alpha)
    us = [u_star - 1.0, u_star, u_star + 1.0]
    # model errors equal (1.0): u = −½β(0 − Δref) ⇒ Δref = 2u/β
    ref_err = torch.tensor([2 * u / beta + 1.0 for u in us] + [1.0] * 3, device=device)
    model_pred = torch.ones(6, 8, device=device)
    out = fastpref.dmpo_loss(model_pred, None, torch.zeros_like(model_pred), ref_err=ref_err, beta=beta, alpha=alpha,
                             reduction="none", backend=backend)  # fmt: skip
    assert abs(out[1].item()) < 1e-6 and out[0].item() > 1e-3 and out[2].item() > 1e-3, out


# ---- kernel vs reference -----------------------------------------------------------------------------

# one pair (one kto row); odd/prime; more than one 16384-element Triton block and 8192-element C++ chunk
SHAPES = [(1, (3, 5, 7)), (3, (4, 13, 17)), (2, (3, 8209))]


@pytest.mark.parametrize("loss", FAMILY)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES, ids=["one_pair", "odd", "multi_block"])
def test_matches_reference(loss, backend, dtype, num_pairs, sample_shape, device):
    skip_unsupported(loss, backend)
    model_pred, ref_pred, target, labels = inputs(loss, num_pairs, sample_shape, dtype, device)
    check_against_reference(loss, backend, model_pred, ref_pred, target, labels=labels)


def _layout(case, model_pred, ref_pred, target):
    """The same values in another memory layout or input form."""
    n = model_pred.shape[0]
    ref_err = None
    if "rowstride" in case:  # a slice of a wider batch: rows strided, samples contiguous
        wide = torch.zeros(n, model_pred[0].numel() + 5, dtype=model_pred.dtype, device=model_pred.device)
        wide[:, : model_pred[0].numel()] = model_pred.reshape(n, -1)
        model_pred = wide[:, : model_pred[0].numel()].view(model_pred.shape)
        assert not model_pred.is_contiguous()
    if "transposed" in case:  # sample dims not contiguous: one explicit copy in the launcher
        model_pred, ref_pred, target = (x.transpose(-1, -2).contiguous().transpose(-1, -2)
                                        for x in (model_pred, ref_pred, target))  # fmt: skip
        assert not model_pred.is_contiguous()
    if "ref_err" in case:
        ref_err = reference.pair_errors(ref_pred, target)
    return model_pred, ref_pred, target, ref_err


LAYOUTS = ["rowstride", "transposed", "shared", "ref_err", "shared+transposed+ref_err"]


@pytest.mark.parametrize("loss", FAMILY)
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_and_input_forms(loss, backend, case, device):
    skip_unsupported(loss, backend)
    if "shared" in case and loss in UNPAIRED:
        pytest.skip("kto is unpaired: no pair shares a target")
    if "ref_err" in case and loss in REF_FREE:
        pytest.skip("reference-free")
    model_pred, ref_pred, target, labels = inputs(loss, 3, (2, 7, 11), torch.bfloat16, device, shared="shared" in case)
    model_pred, ref_pred, target, ref_err = _layout(case, model_pred, ref_pred, target)
    check_against_reference(loss, backend, model_pred, ref_pred, target, ref_err=ref_err, labels=labels)


@pytest.mark.parametrize("loss", FAMILY)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_upstream_weights(loss, backend, reduction, device):
    skip_unsupported(loss, backend)
    model_pred, ref_pred, target, labels = inputs(loss, 5, (3, 9), torch.float32, device)
    check_against_reference(loss, backend, model_pred, ref_pred, target, labels=labels, reduction=reduction)


@pytest.mark.fresh_inputs
def test_fresh_random_inputs(fresh_seed, device):
    """New inputs on every run (the seed is printed): a loss, a backend, a dtype, a shape, a layout and a
    reduction drawn at random, checked like the seeded tests."""
    g = torch.Generator().manual_seed(fresh_seed)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=g))]

    loss, dtype = pick(FAMILY), pick(DTYPES + (torch.float64,))
    backend = pick([b for b in BACKENDS if loss in CPP_LOSSES or b != "cpu"])
    if backend == "cpu" and not extension.available():
        backend = "torch"
    case = pick(["contiguous", "transposed", "rowstride"] + (["ref_err"] if loss not in REF_FREE else []))
    num_pairs = int(torch.randint(1, 6, (), generator=g))
    shape = tuple(int(x) for x in torch.randint(1, 24, (int(torch.randint(1, 4, (), generator=g)),), generator=g))
    shape = shape if len(shape) > 1 else shape + (3,)
    print(f"case: {loss} {backend} {dtype} {num_pairs} pairs of {shape}, {case}")
    model_pred, ref_pred, target, labels = inputs(loss, num_pairs, shape, dtype, device, seed=fresh_seed)
    model_pred, ref_pred, target, ref_err = _layout(case, model_pred, ref_pred, target)
    check_against_reference(loss, backend, model_pred, ref_pred, target, ref_err=ref_err, labels=labels,
                            reduction=pick(["mean", "sum", "none"]))  # fmt: skip


def _preds_with_errors_any(errors, device, d=8):
    e = torch.as_tensor(errors, dtype=torch.float64)
    target = torch.zeros(e.numel(), d, dtype=torch.float64)
    return e.sqrt()[:, None].expand(-1, d).clone().float().to(device), target.float().to(device)


@pytest.mark.parametrize("loss", FAMILY)
def test_extreme_values_are_finite(loss, backend, device):
    """Errors from 0 to 1e4 and margins |u| up to ~1e4: finite loss and gradient, equal to the fp64
    reference where it is finite."""
    skip_unsupported(loss, backend)
    errors = [0.0, 1e-8, 1e-3, 1.0, 1e2, 1e4]
    model_pred, target = _preds_with_errors_any(errors, device)
    ref_err = torch.tensor([1e4, 1e2, 1.0, 1e-3, 1e-8, 0.0], device=device)
    labels = torch.tensor([1, 0, 1, 0, 1, 0], device=device)
    kw = {"mapo": dict(num_train_timesteps=1e6), "orpo": dict(beta=1e5, lambda_orpo=1.0), "dro": dict(margin=0.5),
          "kto": dict(beta=1e6)}.get(loss, dict(beta=5000.0))  # fmt: skip
    m = model_pred.clone().requires_grad_(True)
    r = None if loss in REF_FREE else ref_err
    out = call(loss, m, None, target, ref_err=r, labels=labels, backend=backend, reduction="none", **kw)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(m.grad).all(), (out, m.grad)
    want = call(loss, model_pred.double(), None, target.double(), ref_err=None if r is None else r.double(),
                labels=labels, backend="torch", reduction="none", **kw)  # fmt: skip
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", FAMILY)
@pytest.mark.parametrize("where", ["model_pred", "ref_pred", "target", "ref_err"])
def test_nan_is_never_hidden(loss, backend, where, device):
    skip_unsupported(loss, backend)
    if where in ("ref_pred", "ref_err") and loss in REF_FREE:
        pytest.skip("reference-free")
    model_pred, ref_pred, target, labels = inputs(loss, 2, (3, 4), torch.float32, device)
    ref_err = reference.pair_errors(ref_pred, target) if where == "ref_err" else None
    tensors = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target, "ref_err": ref_err}
    tensors[where] = tensors[where].clone()
    tensors[where].view(-1)[1] = float("nan")
    if ref_err is not None or loss in REF_FREE:
        tensors["ref_pred"] = None
    p = params_for(loss, model_pred, ref_pred, target)
    out = call(loss, tensors["model_pred"], tensors["ref_pred"], tensors["target"], ref_err=tensors["ref_err"],
               labels=labels, backend=backend, reduction="none", **p)  # fmt: skip
    assert torch.isnan(out).any().item(), f"NaN in {where} was hidden: {out}"


@pytest.mark.parametrize("loss", FAMILY)
def test_torch_backend_is_the_reference(loss, device):
    """backend="torch" runs fastpref/reference.py and nothing else."""
    model_pred, ref_pred, target, labels = inputs(loss, 3, (4, 5), torch.float64, device)
    p = params_for(loss, model_pred, ref_pred, target)
    got = call(loss, model_pred, None if loss in REF_FREE else ref_pred, target, labels=labels, backend="torch", **p)
    em = reference.pair_errors(model_pred, target)
    er = torch.zeros_like(em) if loss in REF_FREE else reference.pair_errors(ref_pred, target)
    assert torch.equal(got, losses_of_errors(loss, em, er, labels, p).mean())


def test_reference_gradcheck_fp64():
    """The reference's autograd against finite differences (fp64)."""
    g = torch.Generator().manual_seed(1)
    model_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    labels = labels_for(5)
    for loss in FAMILY:
        p = {"mapo": dict(num_train_timesteps=5.0), "orpo": dict(beta=2.0), "dro": dict(margin=0.05),
             "kto": dict(beta=2.0)}.get(loss, dict(beta=3.0))  # fmt: skip
        rows = 5 if loss in UNPAIRED else 6

        def f(m, loss=loss, p=p, rows=rows):
            r = None if loss in REF_FREE else ref_pred[:rows]
            return call(loss, m[:rows], r, target[:rows], labels=labels, backend="torch", reduction="none", **p)

        assert torch.autograd.gradcheck(f, (model_pred,)), loss


# ---- statistics, backend choice, autocast -------------------------------------------------------------


def test_trainer_statistics_and_the_mean_outside_log_sigma(backend, device):
    """The statistics the Salesforce/diffusers trainers log (margin, implicit accuracy) equal
    fastpref's; and fastpref averages per-pair losses like the paper, not −logσ(mean u) (the Salesforce
    script's mean inside, a different loss for B > 1)."""
    model_pred, ref_pred, target, beta = make_pairs(4, (4, 8, 8), torch.float32, device)
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    inside_term = -0.5 * beta * ((model_losses.chunk(2)[0] - model_losses.chunk(2)[1])
                                 - (ref_losses.chunk(2)[0] - ref_losses.chunk(2)[1]))  # fmt: skip
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    skip_unsupported("sigmoid", backend)
    loss, stats = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta, return_stats=True, backend=backend)
    torch.testing.assert_close(stats.margin, inside_term, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.implicit_accuracy, implicit_acc)  # no exact ties here
    assert (inside_term > 0).any() and (inside_term < 0).any()  # margins of both signs
    assert not torch.allclose(loss, -torch.nn.functional.logsigmoid(inside_term.mean()), rtol=1e-3)


@pytest.mark.parametrize("loss", FAMILY)
def test_stats_match_reference(loss, backend, device):
    skip_unsupported(loss, backend)
    model_pred, ref_pred, target, labels = inputs(loss, 3, (5, 6), torch.float32, device)
    p = params_for(loss, model_pred, ref_pred, target)
    r = None if loss in REF_FREE else ref_pred
    _, stats = call(loss, model_pred, r, target, labels=labels, return_stats=True, backend=backend, **p)
    _, want = call(loss, model_pred, r, target, labels=labels, return_stats=True, backend="torch", **p)
    for name, a in vars(stats).items():
        b = getattr(want, name)
        assert not a.requires_grad, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if loss not in UNPAIRED:
        torch.testing.assert_close(stats.reward_win - stats.reward_lose, stats.margin, rtol=1e-4, atol=1e-4)


def test_implicit_accuracy_counts_ties_half():
    assert fastpref.implicit_accuracy(torch.tensor([1.0, 0.0, -1.0, 0.0])).item() == 0.5
    assert fastpref.implicit_accuracy(torch.tensor([2.0, 0.0, 3.0, 4.0])).item() == 0.875


def test_auto_backend_without_gpu_or_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(extension, "_state", (False, "no C++ compiler"))  # else auto picks the C++ backend
    model_pred, ref_pred, target, beta = make_pairs(2, (3,), torch.float32, "cpu")
    out = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta, backend="auto")
    assert torch.equal(out, reference.pair_loss_ref("sigmoid", model_pred, ref_pred, target, beta=beta)[0])
    with pytest.raises(ValueError, match="backend='triton'"):
        fastpref.dpo_loss(model_pred, ref_pred, target, backend="triton")


def test_autocast_does_not_downcast_the_reduction(backend, device):
    skip_unsupported("dmpo", backend)
    model_pred, ref_pred, target, beta = make_pairs(2, (4, 6), torch.float32, device)
    expected = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend=backend)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        got = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- each loss's own properties ------------------------------------------------------------------


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


def test_mapo_near_zero_and_large_errors(backend, device):
    """The kernels' f and f' across their three regimes (series, closed form, y·e^{−y}) against fp64."""
    skip_unsupported("mapo", backend)
    errors = [0.0, 1e-7, 1e-3, 0.19, 0.21, 0.5, 3.0, 50.0, 119.0, 121.0, 300.0, 1e4]
    model_pred, target = _preds_with_errors_any(errors, device)
    kw = dict(beta=0.3, snr_value=0.5, num_train_timesteps=10.0, reduction="none")
    m = model_pred.clone().requires_grad_(True)
    out = fastpref.mapo_loss(m, target, backend=backend, **kw)
    out.sum().backward()
    m64 = model_pred.double().requires_grad_(True)
    out64 = fastpref.mapo_loss(m64, target.double(), backend="torch", **kw)
    out64.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(m.grad).all()
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-4, atol=1e-6)


def test_orpo_gradient_favours_the_winner(backend, device):
    """A gradient step on the ORPO loss raises the loser's error (only the preference term can) and
    lowers the winner's relative to the loser's; the diffusers script's logσ(e_w − e_l) does the
    opposite to the loser."""
    skip_unsupported("orpo", backend)
    model_pred, _, target, _ = make_pairs(4, (6, 5), torch.float64, device, seed=3)

    def step(loss_fn, lr=1e-3):
        m = model_pred.clone().requires_grad_(True)
        loss_fn(m).backward()
        before = reference.pair_errors(model_pred, target).chunk(2)
        after = reference.pair_errors(model_pred - lr * m.grad, target).chunk(2)
        return after[0] - before[0], after[1] - before[1]

    dw, dl = step(lambda m: fastpref.orpo_loss(m, target, beta=2.0, lambda_orpo=5.0, backend=backend))
    assert (dl > 0).all() and (dw - dl < 0).all()

    def diffusers_orpo(m, beta_orpo=5.0):  # examples/research_projects/diffusion_orpo, transcribed
        model_losses = (m - target).pow(2).mean(dim=[1, 2])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        log_odds = model_losses_w - model_losses_l
        ratio = torch.nn.functional.logsigmoid(log_odds)
        return model_losses_w.mean() - (beta_orpo * ratio).mean()

    dw, dl = step(diffusers_orpo)
    assert (dl < 0).all()


def test_orpo_default_beta_is_the_summed_error_likelihood(device):
    """beta=None: log p = −½·‖ε − ε_θ‖² on summed errors (Diffusion-RPO App. C), i.e. β = D."""
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
def test_kto_any_number_of_rows_and_detached_reference_point(n, backend, device):
    """KTO transcribed with z detached; N odd or even."""
    skip_unsupported("kto", backend)
    model_pred, ref_pred, target, _ = make_pairs(4, (3, 7), torch.float64, device, seed=n)
    model_pred, ref_pred, target = model_pred[:n], ref_pred[:n], target[:n]
    labels = labels_for(n).to(device)
    beta = 50.0
    m_t = model_pred.clone().requires_grad_(True)
    g = (ref_pred - target).pow(2).mean(dim=[1, 2]) - (m_t - target).pow(2).mean(dim=[1, 2])
    z = g.mean().clamp(min=0).detach()
    x = beta * (g - z)
    expected = torch.where(labels.bool(), 1.0 - torch.sigmoid(x), 2.0 * (1.0 - torch.sigmoid(-x))).mean()
    expected.backward()
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
