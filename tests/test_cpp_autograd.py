"""The C++ op's autograd (csrc/autograd.cpp): which outputs are differentiable, the gradient against
the reference for every reduction and upstream-gradient layout, and no double backward."""

import pytest
import torch
from _pairs import make_pairs

from fastpref.ops import extension
from fastpref.ops.family import LOSS_IDS, REDUCTION_IDS, kernel_scalars

pytestmark = pytest.mark.skipif(not extension.available(), reason="the C++ extension did not build here")

ALPHA = 0.2


def _op(model_pred, ref_pred, target, reduction, beta):
    beta, c0, c1 = kernel_scalars("dmpo", beta=beta, alpha=ALPHA)
    return torch.ops.fastpref.pair_loss_fwd(model_pred, ref_pred, target, None, LOSS_IDS["dmpo"], beta, c0, c1,
                                            REDUCTION_IDS[reduction])  # fmt: skip


def test_only_the_loss_is_differentiable():
    model_pred, ref_pred, target, beta = make_pairs(3, (4, 5, 7), torch.float32, "cpu", seed=161)
    model_pred.requires_grad_(True)
    out, margin, errors, dl_de = _op(model_pred, ref_pred, target, "mean", beta)
    assert out.requires_grad and out.grad_fn is not None
    assert not (margin.requires_grad or errors.requires_grad or dl_de.requires_grad)
    with torch.no_grad():
        assert not _op(model_pred, ref_pred, target, "mean", beta)[0].requires_grad
    assert not _op(model_pred.detach(), ref_pred, target, "mean", beta)[0].requires_grad


# The upstream gradient of reduction "none" as autograd hands it over: from .sum() an expanded
# (stride-0) tensor, or whatever layout the caller passes (here a strided slice). The backward reads
# it as a contiguous fp32 array (copied when it is not one): the gradient must be bit-identical to
# the one under the same values given contiguous (whose gradient test_losses.py checks against the
# reference).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upstream", ["expanded", "strided"])
def test_non_contiguous_upstream_gradient_reads_like_a_contiguous_one(dtype, upstream):
    model_pred, ref_pred, target, beta = make_pairs(4, (3, 5, 7), dtype, "cpu", seed=162)
    w = torch.full((), 1.5).expand(4) if upstream == "expanded" else torch.linspace(0.5, 2.0, 8)[::2]
    assert not w.is_contiguous()
    grads = []
    for grad_out in (w, w.contiguous()):
        model = model_pred.detach().requires_grad_(True)
        torch.autograd.backward(_op(model, ref_pred, target, "none", beta)[0], grad_tensors=grad_out)
        grads.append(model.grad)
    assert grads[0].dtype == dtype
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_no_double_backward():
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 4), torch.float32, "cpu", seed=163)
    model = model_pred.detach().requires_grad_(True)
    out = _op(model, ref_pred, target, "sum", beta)[0]
    (g,) = torch.autograd.grad(out, model, create_graph=True)
    assert not g.requires_grad  # the backward op is not differentiable: a second backward fails loudly
    with pytest.raises(RuntimeError):
        g.sum().backward()
