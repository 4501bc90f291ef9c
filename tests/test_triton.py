"""What only the Triton kernel family can get wrong: the split reduction over S, the backward kernel
against finite differences of the forward kernel, bit-reproducibility, batch independence, and the
int64 offsets of very large latents (GPU only).

On a CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1). The interpreter's
launch configuration uses one block per sample and no split, so the split tests set the block and the
split count themselves and assert that the kernels ran with the splits asked for.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
from _pairs import FAMILY, REF_FREE, UNPAIRED, U32, call, check_against_reference, inputs, loss_bound, params_for

import fastpref
from fastpref import reference
from fastpref.ops import pair_loss as pl

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")


@pytest.fixture
def force_splits(monkeypatch):
    """``force_splits(splits, block=None)``: every launch uses ``splits`` splits of S (with the library's
    own chunking when ``block`` is None, else blocks of ``block`` elements, so small test sizes split
    too). Returns the split counts the forward and backward kernels actually ran with."""
    seen = {"fwd": [], "bwd": []}
    real_config, real_fwd, real_bwd = pl.launch_config, pl.pair_err_partials, pl.pair_err_backward

    def install(splits, block=None):
        def config(num_pairs, numel, device, num_splits=None, element_size=2):
            if block is None:
                return real_config(num_pairs, numel, device, splits, element_size)
            num_warps = real_config(num_pairs, numel, device, 1, element_size)[1]
            chunk = triton.cdiv(triton.cdiv(numel, splits), block) * block
            return block, num_warps, triton.cdiv(numel, chunk), chunk

        def fwd(model2d, ref2d, target2d, num_pairs, cfg):
            seen["fwd"].append(cfg)
            return real_fwd(model2d, ref2d, target2d, num_pairs, cfg)

        def bwd(*args, **kw):
            seen["bwd"].append(args[6])
            return real_bwd(*args, **kw)

        monkeypatch.setattr(pl, "launch_config", config)
        monkeypatch.setattr(pl, "pair_err_partials", fwd)
        monkeypatch.setattr(pl, "pair_err_backward", bwd)
        return seen

    return install


# (sample shape, block, splits asked) → D = 231 in 3 splits of 96 (last: 39 = one block + 7);
# D = 200 in 3 splits of 96 (last: 8, less than one block); D = 231 in 2 splits of 128 (last: 103)
SPLIT_CASES = [((3, 7, 11), 32, 3), ((8, 25), 32, 3), ((3, 7, 11), 64, 2)]


@pytest.mark.parametrize("loss", FAMILY)
@pytest.mark.parametrize("shape,block,splits", SPLIT_CASES, ids=["231in3", "200in3", "231in2"])
def test_split_reduction_over_samples(loss, shape, block, splits, force_splits, device):
    """Several programs per sample, the last split partial: forward and backward against fp64."""
    seen = force_splits(splits, block)
    model_pred, ref_pred, target, labels = inputs(loss, 3, shape, torch.float32, device)
    check_against_reference(loss, "triton", model_pred, ref_pred, target, labels=labels)
    d = math.prod(shape)
    for cfg in seen["fwd"] + seen["bwd"]:
        blk, _, run_splits, chunk = cfg
        assert (blk, run_splits) == (block, splits), cfg
        assert 0 < d - (splits - 1) * chunk < chunk  # the last split is partial
    assert len(seen["fwd"]) == 1 and len(seen["bwd"]) == 1


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_split_with_the_launchers_own_chunking(loss, force_splits, device):
    """D = 16411 with two splits as the launcher chunks them (16384-element blocks): the second split
    holds the last 27 elements."""
    seen = force_splits(2)
    model_pred, ref_pred, target, labels = inputs(loss, 2, (16411,), torch.bfloat16, device)
    check_against_reference(loss, "triton", model_pred, ref_pred, target, labels=labels, reduction="none")
    assert [cfg[2:] for cfg in seen["fwd"] + seen["bwd"]] == [(2, 16384)] * 2


def test_split_per_sample_errors_of_rpo(force_splits, device):
    """The per-sample errors RPO builds on (fused_pair_errors) with 3 splits, and their gradient."""
    seen = force_splits(3, 32)
    model_pred, ref_pred, target, beta = inputs("sigmoid", 3, (3, 7, 11), torch.float32, device)[:3] + (None,)
    m = model_pred.clone().requires_grad_(True)
    em, er = pl.fused_pair_errors(m, ref_pred, target)
    up = torch.rand(em.shape, device=device) + 0.5
    (em * up).sum().backward()
    m64 = model_pred.double().requires_grad_(True)
    em64 = reference.pair_errors(m64, target.double())
    (em64 * up.double()).sum().backward()
    assert [cfg[2] for cfg in seen["fwd"] + seen["bwd"]] == [3, 3]
    torch.testing.assert_close(em.double(), em64.detach(), rtol=64 * U32, atol=0)
    torch.testing.assert_close(er.double(), reference.pair_errors(ref_pred.double(), target.double()),
                               rtol=64 * U32, atol=0)  # fmt: skip
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=16 * U32, atol=1e-12)


def test_launch_config_splits_and_chunks():
    """The launcher's split arithmetic: chunks are whole blocks, no split is empty, the splits cover S."""
    cpu = torch.device("cpu")
    for numel in (1, 27, 231, 16384, 16385, 16411, 100_000):
        for asked in (1, 2, 3, 7):
            block, _, splits, chunk = pl.launch_config(2, numel, cpu, asked)
            assert chunk % block == 0 and 1 <= splits <= asked
            assert (splits - 1) * chunk < numel <= splits * chunk
    assert pl.launch_config(2, 16411, cpu, 2)[2:] == (2, 16384)
    assert pl.launch_config(2, 231, cpu, 3)[2] == 1  # one 256-element block: the interpreter's default


# ---- the backward kernel against finite differences of the forward kernel ---------------------------


@pytest.mark.parametrize("loss", FAMILY)
def test_gradient_matches_finite_differences(loss, device):
    """fp64 inputs (the kernels read them and do fp32 math): the directional derivative of the Triton
    loss along a random direction v, by Richardson-extrapolated central differences of the Triton
    forward, equals Σ grad·v from the Triton backward.

    Tolerance, from fp32 rounding: each forward evaluation is within δ of the exact loss (the bound of
    ``_pairs.loss_bound``), so the extrapolated difference (4·D(h/2) − D(h))/3 is within 3δ/h of the
    exact one; plus twice the truncation error of the same stencil on the fp64 reference (O(h⁴)), plus
    the backward's own fp32 error bound summed along v. For kto, v keeps the reference point z (a
    constant of the gradient) fixed to first order."""
    model_pred, ref_pred, target, labels = inputs(loss, 3, (5, 7), torch.float64, device)
    p = params_for(loss, model_pred, ref_pred, target)
    r = None if loss in REF_FREE else ref_pred
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model_pred.shape, generator=g, dtype=torch.float64).to(device)

    def ref_loss(x):
        return call(loss, x, r, target, labels=labels, backend="torch", **p)

    if loss in UNPAIRED:  # keep kto's reference point z = max(0, mean(e_ref − e_θ)) constant to first order
        diff = (model_pred - target).reshape(len(model_pred), -1)  # (z is a constant of the gradient; its
        de = 2 * (diff * v.reshape(diff.shape)).mean(1)  # O(t²) change cancels in central differences)
        v = v - (de.sum() / (2 * diff.square().mean(1)).sum()) * (model_pred - target)
    x64 = model_pred.clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(ref_loss(x64), x64)
    v = v / (g64 * v).sum().abs()  # |dL/dt| = 1 along v
    h = 0.05

    def richardson(f):
        d1 = (f(model_pred + h * v) - f(model_pred - h * v)) / (2 * h)
        d2 = (f(model_pred + h / 2 * v) - f(model_pred - h / 2 * v)) / h
        return (4 * d2 - d1) / 3

    if loss in ("hinge", "dro"):  # the stencil must not cross a kink of the hinge
        for t in (-h, h):
            _, st = call(loss, model_pred + t * v, r, target, backend="torch", return_stats=True, **p)
            _, s0 = call(loss, model_pred, r, target, backend="torch", return_stats=True, **p)
            kink = 1.0 if loss == "hinge" else p["margin"]
            assert torch.equal(st.margin < kink, s0.margin < kink), "kink inside the stencil: pick another seed"

    truncation = (richardson(lambda x: ref_loss(x).double()) - 1.0 * torch.sign((g64 * v).sum())).abs().item()
    fd = richardson(lambda x: call(loss, x, r, target, labels=labels, backend="triton", **p).double()).item()
    delta = max(loss_bound(loss, x, r, target, labels=labels, p=p)[1].item()
                for x in (model_pred + t * v for t in (-h, -h / 2, h / 2, h)))  # fmt: skip

    m = model_pred.clone().requires_grad_(True)
    call(loss, m, r, target, labels=labels, backend="triton", **p).backward()
    assert m.grad.dtype == torch.float64
    analytic = (m.grad * v).sum().item()
    grad_err = ((m.grad.abs() * 16 * U32 + 1e-12) * v.abs()).sum().item() + 1e-6 * abs(analytic)
    tol = 3 * delta / h + 2 * truncation + grad_err
    assert abs(analytic - fd) <= tol, f"{loss}: backward {analytic:.8f} vs finite differences {fd:.8f} (tol {tol:.2e})"
    assert tol < 0.02, f"{loss}: the tolerance {tol:.2e} is too loose to bite"


def test_dmpo_gradient_vanishes_at_the_log_odds(device):
    """The zero of DMPO's kernel gradient, found by bisection, sits at u* = log((1−α)/α)."""
    alpha, beta = 0.01, 2000.0
    u_star = math.log((1 - alpha) / alpha)

    def dl_du_sign(u):
        # model errors equal (c² = 0.25), ref errors carry the margin: Δref = 2u/β; the gradient on the
        # winner is ∂ℓ/∂u·(−½β)·2c/D, so its sign is opposite to ∂ℓ/∂u
        pred = torch.full((2, 4), 0.5, device=device, requires_grad=True)
        err = torch.tensor([2 * u / beta + 1.0, 1.0], dtype=torch.float64, device=device)
        fastpref.dmpo_loss(pred, None, torch.zeros(1, 4, device=device), ref_err=err, beta=beta, alpha=alpha,
                           backend="triton").backward()  # fmt: skip
        return -torch.sign(pred.grad[0, 0]).item()

    lo, hi = 0.0, 10.0
    assert dl_du_sign(lo) < 0 < dl_du_sign(hi)
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dl_du_sign(mid) < 0 else (lo, mid)
    assert abs(0.5 * (lo + hi) - u_star) < 1e-3


# ---- reproducibility -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["dmpo", "kto"])
def test_inputs_unchanged_and_runs_bit_identical(loss, device):
    model_pred, ref_pred, target, labels = inputs(loss, 3, (4, 9, 5), torch.bfloat16, device)
    p = params_for(loss, model_pred, ref_pred, target)
    before = [t.clone() for t in (model_pred, ref_pred, target)]
    results = []
    for _ in range(2):
        m = model_pred.clone().requires_grad_(True)
        out = call(loss, m, ref_pred, target, labels=labels, backend="triton", **p)
        out.backward()
        results.append((out.detach(), m.grad))
    for a, b in zip(before, (model_pred, ref_pred, target)):
        assert torch.equal(a, b)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", [x for x in FAMILY if x not in UNPAIRED])
def test_two_half_batches_equal_one_batch(loss, device):
    """Per-pair losses and gradients do not depend on the rest of the batch (bitwise)."""
    model_pred, ref_pred, target, _ = inputs(loss, 4, (5, 7), torch.float32, device)
    p = params_for(loss, model_pred, ref_pred, target)

    def run(idx):  # pairs idx, laid out [w_idx; l_idx]
        rows = torch.cat([idx, idx + 4])
        m = model_pred[rows].clone().requires_grad_(True)
        out = call(loss, m, ref_pred[rows], target[rows], backend="triton", reduction="none", **p)
        out.sum().backward()
        return out.detach(), m.grad

    full, g_full = run(torch.arange(4))
    (h1, g1), (h2, g2) = run(torch.arange(2)), run(torch.arange(2, 4))
    assert torch.equal(full, torch.cat([h1, h2]))
    assert torch.equal(g_full, torch.cat([g1[:2], g2[:2], g1[2:], g2[2:]]))


@requires_gpu
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
