"""Diffusion-KTO across processes: ``kto_loss(..., group=…)`` takes the reference point z over the
samples of every rank, as the diffusion-kto training script does (``accelerator.reduce``), so two
processes holding halves of a batch compute what one process computes on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpref

EPS32 = torch.finfo(torch.float32).eps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(seed: int):
    """7 unlabelled-order samples (3 on rank 0, 4 on rank 1). The policy beats the reference on rank 0's
    samples (g > 0) and loses on rank 1's (g < 0), so each rank's own z differs from the global one."""
    g = torch.Generator().manual_seed(seed)
    n, shape = 7, (3, 5, 7)
    target = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    ref_pred = target + torch.randn(n, *shape, generator=g, dtype=torch.float64)
    shrink = torch.tensor([0.85, 0.9, 0.8, 1.05, 1.1, 1.02, 1.08], dtype=torch.float64).view(n, 1, 1, 1)
    model_pred = target + shrink * (ref_pred - target) + 0.05 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    rows = [torch.arange(0, 3), torch.arange(3, 7)]
    return model_pred.float(), ref_pred.float(), target.float(), labels, rows


def test_reference_point_is_the_global_mean_across_two_gloo_processes(tmp_path):
    """2 processes × (3, 4) samples, both backends: every rank's z equals the one-process z of the 7
    samples, and so do its per-sample losses and the gradient w.r.t. its rows of model_pred."""
    model_pred, ref_pred, target, labels, rows = _global_batch(seed=15)
    beta, lam_u = 10.0, 1.5
    torch.save(dict(model_pred=model_pred, ref_pred=ref_pred, target=target, labels=labels, rows=rows, beta=beta,
                    lambda_undesirable=lam_u), tmp_path / "inputs.pt")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "_kto_dist_worker.py"), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    # fp32 allowance, whatever the summation order: each error e carries |δe| ≤ 2·eps32·e (the Triton
    # kernel splits the D-sum by the batch size), g = e_ref − e_θ twice that; z sums 7 g's in another
    # grouping (+ 7·eps32·max|g|); x = β(g − z) moves by β(δg + δz); ℓ = λ(1 − σ(±x)) by λ·¼·δx; the
    # gradient λ·σ'(x)·β·(2/D)(pred − target) by λ·max|σ''|·δx·β·(2/D)·max|pred − target|.
    e_m = (model_pred.double() - target.double()).square().flatten(1).mean(1)
    e_r = (ref_pred.double() - target.double()).square().flatten(1).mean(1)
    d_g = 4 * EPS32 * torch.maximum(e_m, e_r).max().item()
    d_z = d_g + 7 * EPS32 * (e_r - e_m).abs().max().item()
    d_x = beta * (d_g + d_z)
    lam = max(1.0, lam_u)
    loss_tol = lam * 0.25 * d_x
    grad_tol = lam * 0.0963 * d_x * beta * 2 / model_pred[0].numel() * (model_pred - target).abs().max().item()

    for backend in ("torch", "triton"):
        mp = model_pred.clone().requires_grad_(True)
        losses, stats = fastpref.kto_loss(mp, ref_pred, target, labels, beta=beta, lambda_undesirable=lam_u,
                                          reduction="none", return_stats=True, backend=backend)  # fmt: skip
        losses.sum().backward()
        z = stats.reference_point
        assert z > 10 * d_z, "the global reference point must be positive for the test to bite"
        for r, idx in enumerate(rows):
            got = torch.load(tmp_path / f"rank{r}_{backend}.pt")
            what = f"{backend} rank {r}"
            torch.testing.assert_close(got["z"], z, rtol=0, atol=d_z, msg=what)
            torch.testing.assert_close(got["losses"], losses.detach()[idx], rtol=1e-6, atol=loss_tol, msg=what)
            torch.testing.assert_close(got["grad"], mp.grad[idx], rtol=1e-5, atol=grad_tol, msg=what)
            # the rank's own batch has another z: a local reference point would fail the checks above
            _, local = fastpref.kto_loss(model_pred[idx], ref_pred[idx], target[idx], labels[idx], beta=beta,
                                         return_stats=True, backend=backend)  # fmt: skip
            assert (local.reference_point - z).abs() > 100 * d_z, what


def test_group_needs_an_initialised_process_group():
    model_pred, ref_pred, target, labels, _ = _global_batch(seed=1)
    with pytest.raises(ValueError, match="group= needs an initialised torch.distributed process group"):
        fastpref.kto_loss(model_pred, ref_pred, target, labels, group=object())
