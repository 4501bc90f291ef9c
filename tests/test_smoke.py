import torch

import fastpref


def test_dmpo_loss_runs_on_the_reference_backend():
    g = torch.Generator().manual_seed(0)
    model_pred = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    ref_pred, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    loss = fastpref.dmpo_loss(model_pred, ref_pred, target, backend="torch")
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss)
    assert model_pred.grad.abs().sum() > 0
