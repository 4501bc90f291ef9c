"""The README's drop-in β mappings, checked against each public script's own loss lines.

Each ``script_*`` function below is the loss computation of one public training script, written out
as that script computes it (winners first, then losers; per-sample means, or sums where the script
sums); the test runs it and ``fastpref`` with the β the README gives for that script on the same
seeded inputs.
"""

import pytest
import torch
import torch.nn.functional as F

import fastpref


def _inputs(seed, shape=(4, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    n = 2 * 5  # 5 pairs
    target = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    model_pred = target + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    ref_pred = target + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return model_pred, ref_pred, target


def _diffs(model_pred, ref_pred, target, reduce=torch.mean):
    dims = list(range(1, model_pred.dim()))
    model_losses_w, model_losses_l = reduce((model_pred - target).pow(2), dim=dims).chunk(2)
    ref_losses_w, ref_losses_l = reduce((ref_pred - target).pow(2), dim=dims).chunk(2)
    return model_losses_w - model_losses_l, ref_losses_w - ref_losses_l


def script_salesforce_and_diffusers_sdxl(model_pred, ref_pred, target, beta_dpo):
    """Salesforce DiffusionDPO train.py and diffusers train_diffusion_dpo_sdxl.py."""
    model_diff, ref_diff = _diffs(model_pred, ref_pred, target)
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def script_diffusers_sd15(model_pred, ref_pred, target, beta_dpo, loss_type="sigmoid", beta=None):
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (no ½)."""
    model_diff, ref_diff = _diffs(model_pred, ref_pred, target)
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        return -1 * F.logsigmoid(beta_dpo * logits).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta_dpo * logits).mean()
    return ((logits - 1 / (2 * beta)) ** 2).mean()  # "ipo", with the β the branch means (args.beta)


def script_simpletuner_flow_dpo(model_pred, ref_pred, target, beta, norm_type):
    """SimpleTuner simpletuner/helpers/distillation/flow_dpo/distiller.py (fixed β, no mask)."""
    reduce = torch.sum if norm_type == "sum" else torch.mean
    dims = list(range(1, model_pred.dim()))
    pw, pl = reduce((model_pred - target).pow(2), dim=dims).chunk(2)
    rw, rl = reduce((ref_pred - target).pow(2), dim=dims).chunk(2)
    margin = (rw - pw) + (pl - rl)
    logits = 0.5 * beta * margin
    return -F.logsigmoid(logits).mean()


def test_salesforce_and_sdxl_beta_maps_one_to_one():
    m, r, t = _inputs(1)
    want = script_salesforce_and_diffusers_sdxl(m, r, t, beta_dpo=5000)
    got = fastpref.dpo_loss(m, r, t, beta=5000, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_diffusers_sd15_beta_is_twice_beta_dpo(loss_type):
    m, r, t = _inputs(2)
    want = script_diffusers_sd15(m, r, t, beta_dpo=2500, loss_type=loss_type)
    got = fastpref.dpo_loss(m, r, t, beta=2 * 2500, kind=loss_type, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    literal = fastpref.dpo_loss(m, r, t, beta=2500, kind=loss_type, backend="torch")
    assert not torch.allclose(literal, want)  # β = beta_dpo would be a different loss


def test_diffusers_sd15_ipo_beta_maps_one_to_one():
    m, r, t = _inputs(3)
    want = script_diffusers_sd15(m, r, t, beta_dpo=None, loss_type="ipo", beta=0.1)
    got = fastpref.dpo_loss(m, r, t, beta=0.1, kind="ipo", backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("norm_type", ["mean", "sum"])
def test_simpletuner_flow_dpo_beta(norm_type):
    m, r, t = _inputs(4)
    d = m[0].numel()
    want = script_simpletuner_flow_dpo(m, r, t, beta=0.5 if norm_type == "sum" else 500.0, norm_type=norm_type)
    beta = d * 0.5 if norm_type == "sum" else 500.0  # "sum" errors are D × fastpref's mean errors
    got = fastpref.dpo_loss(m, r, t, beta=beta, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
