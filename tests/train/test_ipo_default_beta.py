"""--loss ipo without --beta trains: it uses IPO's own β (0.1), not DPO's 5000."""

import types

import torch

import fastpref
from fastpref.train.objectives import IPO_DEFAULT_BETA, get_objective


def _pairs(seed=11):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 4, 8, 8, generator=g)
    model_pred = torch.cat([target, target]) + 0.2 * torch.randn(6, 4, 8, 8, generator=g)
    ref_pred = torch.cat([target, target]) + 0.2 * torch.randn(6, 4, 8, 8, generator=g)
    return model_pred, ref_pred, target


def test_ipo_objective_defaults_to_ipo_beta_and_has_a_gradient():
    model_pred, ref_pred, target = _pairs()
    cfg = types.SimpleNamespace(beta=None, alpha=0.01)
    m = model_pred.clone().requires_grad_(True)
    loss, _ = get_objective("ipo").call(m, {"ref_pred": ref_pred}, target, cfg)
    want = fastpref.dpo_loss(model_pred, ref_pred, target, kind="ipo", beta=IPO_DEFAULT_BETA, backend="torch")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=0)
    loss.backward()
    g_default = m.grad.norm()
    m5000 = model_pred.clone().requires_grad_(True)
    fastpref.dpo_loss(m5000, ref_pred, target, kind="ipo", beta=5000.0, backend="torch").backward()
    assert g_default > 1e3 * m5000.grad.norm()  # DPO's β gives IPO a vanishing gradient


def test_explicit_beta_still_wins():
    model_pred, ref_pred, target = _pairs(12)
    cfg = types.SimpleNamespace(beta=2.0, alpha=0.01)
    loss, _ = get_objective("ipo").call(model_pred, {"ref_pred": ref_pred}, target, cfg)
    want = fastpref.dpo_loss(model_pred, ref_pred, target, kind="ipo", beta=2.0, backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=0)
