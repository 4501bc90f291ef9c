"""The fused pair-loss kernel family against the reference (fastpref/reference.py).

On a CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); on a GPU the
same tests run natively.
"""

import math

import pytest
import torch
from _pairs import DTYPES, LOSSES, assert_within_rule, fp32_accumulation_allowance, make_pairs, naive_at_dtype

import fastpref
from fastpref import reference
from fastpref.ops.family import kernel_scalars
from fastpref.ops.library import triton_pair_loss


def call(loss, *args, backend="triton", **kw):
    """The public function for a loss name of the kernel family."""
    if loss == "dmpo":
        return fastpref.dmpo_loss(*args, backend=backend, **kw)
    return fastpref.dpo_loss(*args, kind=loss, backend=backend, **kw)


def check_against_reference(loss, model_pred, ref_pred, target, *, ref_err=None, beta, reduction="mean"):
    """Kernel loss and gradient vs the fp64 reference, under the per-dtype rule."""
    dtype = model_pred.dtype
    alpha = 0.05
    kw = dict(ref_err=ref_err, beta=beta, reduction=reduction)
    if loss == "dmpo":
        kw["alpha"] = alpha
    m = model_pred.detach().clone().requires_grad_(True)
    out = call(loss, m, ref_pred, target, **kw)
    weights = torch.rand(out.shape, dtype=torch.float32, device=out.device) + 0.5
    (out * weights).sum().backward()

    m64 = model_pred.detach().double().requires_grad_(True)
    r64 = None if ref_pred is None else ref_pred.double()
    e64 = None if ref_err is None else ref_err.double()
    out64, u64, em64, er64 = reference.pair_loss_ref(
        loss, m64, r64, target.double(), ref_err=e64, beta=beta, alpha=alpha, reduction=reduction
    )
    (out64 * weights.double()).sum().backward()

    ml = model_pred.detach().clone().requires_grad_(True)
    naive = naive_at_dtype(loss, ml, ref_pred, target, ref_err=ref_err, beta=beta, alpha=alpha, reduction=reduction)
    (naive * weights.to(naive.dtype)).sum().backward()

    t64 = target.double() if target.shape[0] == model_pred.shape[0] else torch.cat([target, target]).double()
    w64 = weights.double().expand(u64.shape)
    loss_allow, grad_allow = fp32_accumulation_allowance(
        loss, u64, torch.cat([em64, er64]), beta, alpha, w64, (m64 - t64).abs().max().item(), reduction,
        model_pred[0].numel(),
    )
    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert m.grad.dtype == dtype and m.grad.shape == model_pred.shape
    assert_within_rule(out, out64, naive, dtype, f"{loss} loss", loss_allow)
    assert_within_rule(m.grad, m64.grad, ml.grad, dtype, f"{loss} grad", grad_allow)


SHAPES = [(1, (3, 5, 7)), (3, (4, 13, 17)), (2, (16411,))]  # one pair; odd/prime; > one 16384-block


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES, ids=["one_pair", "odd", "multi_block"])
def test_matches_reference(loss, dtype, num_pairs, sample_shape, device):
    model_pred, ref_pred, target, beta = make_pairs(num_pairs, sample_shape, dtype, device)
    check_against_reference(loss, model_pred, ref_pred, target, beta=beta)


def _layout(case, model_pred, ref_pred, target):
    """Re-present the same values in another memory layout or input form."""
    n = model_pred.shape[0]
    ref_err = None
    if "rowstride" in case:  # a slice of a wider batch: rows are strided, samples contiguous
        wide = torch.zeros(n, model_pred[0].numel() + 5, dtype=model_pred.dtype, device=model_pred.device)
        wide[:, : model_pred[0].numel()] = model_pred.reshape(n, -1)
        model_pred = wide[:, : model_pred[0].numel()].view(model_pred.shape)
    if "transposed" in case:  # sample dims not contiguous: one explicit copy in the launcher
        model_pred = model_pred.transpose(-1, -2).contiguous().transpose(-1, -2)
        ref_pred = ref_pred.transpose(-1, -2).contiguous().transpose(-1, -2)
        target = target.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not model_pred.is_contiguous()
    if "ref_err" in case:
        ref_err = reference.pair_errors(ref_pred, target)
        ref_pred = None
    return model_pred, ref_pred, target, ref_err


LAYOUTS = ["rowstride", "transposed", "shared", "ref_err", "shared+transposed+ref_err"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_and_input_forms(loss, dtype, case, device):
    model_pred, ref_pred, target, beta = make_pairs(3, (2, 7, 11), dtype, device, shared="shared" in case)
    model_pred, ref_pred, target, ref_err = _layout(case, model_pred, ref_pred, target)
    check_against_reference(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_upstream_weights(loss, reduction, device):
    model_pred, ref_pred, target, beta = make_pairs(5, (3, 9), torch.float32, device)
    check_against_reference(loss, model_pred, ref_pred, target, beta=beta, reduction=reduction)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("grad_scale", [1.0, 2.0])
def test_grad_output_scalar(loss, grad_scale, device):
    model_pred, ref_pred, target, beta = make_pairs(2, (5, 7), torch.float32, device)
    m = model_pred.clone().requires_grad_(True)
    (call(loss, m, ref_pred, target, beta=beta) * grad_scale).backward()
    m64 = model_pred.double().requires_grad_(True)
    (call(loss, m64, ref_pred.double(), target.double(), beta=beta, backend="torch") * grad_scale).backward()
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_reduction_over_samples(splits, device):
    """The S-split path (several programs per pair, used on GPUs when 2B is small)."""
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 7, 11), torch.float32, device, shared=True)
    m = model_pred.clone().requires_grad_(True)
    beta_k, c0, c1 = kernel_scalars("dmpo", beta=beta, alpha=0.01)
    out, u, err = triton_pair_loss(
        "dmpo", m, ref_pred, target, None, beta=beta_k, c0=c0, c1=c1, reduction="mean", num_splits=splits
    )
    out.backward()
    m64 = model_pred.double().requires_grad_(True)
    out64, u64, e64, r64 = reference.pair_loss_ref(
        "dmpo", m64, ref_pred.double(), target.double(), beta=beta, alpha=0.01
    )
    out64.backward()
    # u = −½β·Δ amplifies the fp32 rounding of the errors: hold u, the loss and the gradient to the
    # fp32-accumulation bound of the computation (see _pairs.fp32_accumulation_allowance), the errors to fp32.
    t64 = torch.cat([target, target]).double()
    loss_allow, grad_allow = fp32_accumulation_allowance(
        "dmpo", u64, torch.cat([e64, r64]), beta, 0.01, torch.ones_like(u64),
        (m64 - t64).abs().max().item(), "mean", model_pred[0].numel(),
    )
    du = 4.0 * beta * 2.0 * torch.finfo(torch.float32).eps * torch.cat([e64, r64]).abs().max().item()
    torch.testing.assert_close(err[0].double(), e64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(err[1].double(), r64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(u.double(), u64, rtol=0, atol=du + 1e-6)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=loss_allow + 1e-6)
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-5, atol=grad_allow + 1e-8)


def _at_margin(u_values, beta, device, c=0.5):
    """Inputs whose margin is exactly ``u_values``: model errors equal (c² for winner and loser,
    model_pred = target + c) and the precomputed reference errors carry the margin,
    u = −½β(0 − Δref) ⇒ Δref = 2u/β."""
    u_values = torch.as_tensor(u_values, dtype=torch.float64)
    b = u_values.numel()
    target = torch.zeros(b, 4, device=device)
    model_pred = torch.full((2 * b, 4), c, device=device)
    ref_err = torch.cat([2 * u_values / beta + 1.0, torch.ones(b, dtype=torch.float64)]).to(device=device)
    return model_pred, target, ref_err


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_margins_are_finite(loss, device):
    beta = 5000.0
    us = [-1e4, -50.0, 0.0, 50.0, 1e4]
    model_pred, target, ref_err = _at_margin(us, beta, device)
    m = model_pred.requires_grad_(True)
    out, stats = call(loss, m, None, target, ref_err=ref_err, beta=beta, reduction="none", return_stats=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(m.grad).all()
    torch.testing.assert_close(stats.margin.double().cpu(), torch.tensor(us, dtype=torch.float64), rtol=1e-6, atol=1e-2)
    expected = reference.PAIR_LOSSES[loss](torch.tensor(us, dtype=torch.float64), beta, 0.01)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_dmpo_minimum_sits_at_log_odds(device):
    """DMPO's ℓ(u) is minimal (= 0) at u* = log((1−α)/α): the kernel's loss on a grid, and the
    zero of the kernel's gradient found by bisection."""
    alpha, beta = 0.01, 2000.0
    u_star = math.log((1 - alpha) / alpha)
    grid = torch.linspace(0.0, 10.0, 1001, dtype=torch.float64)
    model_pred, target, ref_err = _at_margin(grid, beta, device)
    losses = fastpref.dmpo_loss(model_pred, None, target, ref_err=ref_err, beta=beta, alpha=alpha,
                                reduction="none", backend="triton")  # fmt: skip
    assert abs(grid[losses.argmin().item()].item() - u_star) <= 0.01
    assert losses.min().item() < 1e-6

    def dl_du_sign(u):
        # model_pred = target + c: ∂ℓ/∂pred_w = ∂ℓ/∂u · (−½β) · 2c/D, so the signs are opposite
        pred, tgt, err = _at_margin([u], beta, device)
        pred.requires_grad_(True)
        fastpref.dmpo_loss(pred, None, tgt, ref_err=err, beta=beta, alpha=alpha, backend="triton").backward()
        return -torch.sign(pred.grad[0, 0]).item()

    lo, hi = 0.0, 10.0
    assert dl_du_sign(lo) < 0 < dl_du_sign(hi)
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dl_du_sign(mid) < 0 else (lo, mid)
    assert abs(0.5 * (lo + hi) - u_star) < 1e-3


def test_independent_transcription_of_public_trainers(device):
    """The Diffusion-DPO loss exactly as the Salesforce/diffusers trainers write it."""
    # Seeded: the mean-inside check below needs margins of both signs (at large |u| of one sign, −log σ is
    # linear and the two losses coincide). β from make_pairs keeps |u| ≲ 3, where the trainers' formula is
    # well conditioned in fp32.
    model_pred, ref_pred, target, beta_dpo = make_pairs(4, (4, 8, 8), torch.float32, device, seed=20251129)

    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    expected = -1 * torch.nn.functional.logsigmoid(inside_term).mean()

    loss, stats = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta_dpo, return_stats=True, backend="triton")
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.margin, inside_term, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.implicit_accuracy, implicit_acc)  # no exact ties here

    # The Salesforce script's `-logsigmoid(inside_term.mean())` (mean inside) is a different loss
    # for B > 1; fastpref averages per-pair losses, like the paper.
    assert (inside_term > 0).any() and (inside_term < 0).any()  # the seed gives margins of both signs
    buggy = -torch.nn.functional.logsigmoid(inside_term.mean())
    assert not torch.allclose(loss, buggy, rtol=1e-3)


def test_stats_match_reference(device):
    model_pred, ref_pred, target, beta = make_pairs(3, (5, 6), torch.float32, device)
    _, stats = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, return_stats=True, backend="triton")
    _, ref_stats = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, return_stats=True, backend="torch")
    for name in ("margin", "model_err_win", "model_err_lose", "ref_err_win", "ref_err_lose", "reward_win",
                 "reward_lose", "implicit_accuracy"):  # fmt: skip
        a, b = getattr(stats, name), getattr(ref_stats, name)
        assert not a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(stats.reward_win - stats.reward_lose, stats.margin, rtol=1e-4, atol=1e-4)


def test_implicit_accuracy_counts_ties_half():
    assert fastpref.implicit_accuracy(torch.tensor([1.0, 0.0, -1.0, 0.0])).item() == 0.5
    assert fastpref.implicit_accuracy(torch.tensor([2.0, 0.0, 3.0, 4.0])).item() == 0.875


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("where", ["model_pred", "ref_pred", "target", "ref_err"])
def test_nan_is_never_hidden(loss, where, device):
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 4), torch.float32, device)
    ref_err = reference.pair_errors(ref_pred, target) if where == "ref_err" else None
    tensors = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target, "ref_err": ref_err}
    tensors[where] = tensors[where].clone()
    tensors[where].view(-1)[1] = float("nan")
    if ref_err is not None:
        tensors["ref_pred"] = None
    out = call(loss, tensors["model_pred"], tensors["ref_pred"], tensors["target"], ref_err=tensors["ref_err"],
               beta=beta, reduction="none")  # fmt: skip
    assert torch.isnan(out).any().item(), f"NaN in {where} was hidden: {out}"


def test_inputs_unchanged_and_runs_bit_identical(device):
    model_pred, ref_pred, target, beta = make_pairs(3, (4, 9, 5), torch.bfloat16, device, shared=True)
    before = [t.clone() for t in (model_pred, ref_pred, target)]
    results = []
    for _ in range(2):
        m = model_pred.clone().requires_grad_(True)
        loss, stats = fastpref.dmpo_loss(m, ref_pred, target, beta=beta, return_stats=True, backend="triton")
        loss.backward()
        results.append((loss.detach(), stats.margin, m.grad))
    for a, b in zip(before, (model_pred, ref_pred, target)):
        assert torch.equal(a, b)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", LOSSES)
def test_two_half_batches_equal_one_batch(loss, device):
    """Per-pair losses and gradients do not depend on the rest of the batch (bitwise)."""
    model_pred, ref_pred, target, beta = make_pairs(4, (5, 7), torch.float32, device)

    def run(idx):  # pairs idx, laid out [w_idx; l_idx]
        rows = torch.cat([idx, idx + 4])
        m = model_pred[rows].clone().requires_grad_(True)
        out = call(loss, m, ref_pred[rows], target[rows], beta=beta, reduction="none")
        out.sum().backward()
        return out.detach(), m.grad

    full, g_full = run(torch.arange(4))
    (h1, g1), (h2, g2) = run(torch.arange(2)), run(torch.arange(2, 4))
    assert torch.equal(full, torch.cat([h1, h2]))
    assert torch.equal(g_full, torch.cat([g1[:2], g2[:2], g1[2:], g2[2:]]))


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    model_pred = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_pred = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    for loss in LOSSES:
        def f(m, loss=loss):
            return reference.pair_loss_ref(loss, m, ref_pred, target, beta=3.0, alpha=0.1, reduction="none")[0]

        assert torch.autograd.gradcheck(f, (model_pred,)), loss


def test_auto_backend_without_gpu_or_interpreter_uses_reference(monkeypatch):
    from fastpref.ops import extension

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(extension, "_state", (False, "no C++ compiler"))  # else auto picks the C++ backend
    model_pred, ref_pred, target, beta = make_pairs(2, (3,), torch.float32, "cpu")
    out = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta, backend="auto")
    ref = reference.pair_loss_ref("sigmoid", model_pred, ref_pred, target, beta=beta)[0]
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="backend='triton'"):
        fastpref.dpo_loss(model_pred, ref_pred, target, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_gpu_large_latent_split_and_int64_offsets():
    """2B·D > 2**31 elements (video-scale batch) with few samples: split reduction + int64 rows."""
    num_pairs, d = 2, 2**29 + 17  # 4 samples × 537 M elements, bf16: 4.3 GB per tensor
    target = torch.randn(num_pairs, d, device="cuda", dtype=torch.bfloat16)
    model_pred = torch.cat([target, target]) + 0.1
    model_pred[1::2] += 0.05
    model_pred.requires_grad_(True)
    ref_err = torch.tensor([0.01, 0.0125, 0.01, 0.01], device="cuda")
    loss = fastpref.dpo_loss(model_pred, None, target, ref_err=ref_err, beta=1000.0, backend="triton")
    loss.backward()
    ref = fastpref.dpo_loss(model_pred.detach(), None, target, ref_err=ref_err, beta=1000.0, backend="torch")
    torch.testing.assert_close(loss, ref.float(), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(model_pred.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_does_not_downcast_the_reduction(backend, device):
    model_pred, ref_pred, target, beta = make_pairs(2, (4, 6), torch.float32, device)
    expected = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend=backend)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        got = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
