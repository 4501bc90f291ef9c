"""Diffusion-RPO M×M benchmark (Gu et al., 2024, arXiv:2406.06382, eq. 9): M winners against M losers
with CLIP weights.

    W = softmax_j(−(1 − cos(a_i, b_j))/τ),   L = −(1/M)·Σ_ij W_ij·log σ(u_ij)

Each case holds M pairs of small latents (4×8×8, so the per-sample errors are cheap and the M×M part
dominates), precomputed ``ref_err`` and (M, 768) fp32 embeddings (CLIP ViT-L/14 width). The eager
provider is the reference composition (errors → ``clip_pair_weights_ref`` → ``rpo``, the M×M
matrices materialised, as the paper's code does); ``fastpref-<backend>`` calls ``fastpref.rpo_loss``
for the backends with a fused RPO kernel (:data:`FUSED_RPO_BACKENDS`).
Skipped, with the reason, while ``fastpref.rpo_loss`` does not exist.

Bytes moved count the inputs (latents and embeddings, the latter read again in backward to recompute
W) and the gradient; at large M the op is compute-bound (≈ 2·M²·K flops per pass for the cosines), so
``x_floor`` against the bandwidth floor overstates the distance to the device's limit there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

import fastpref
from fastpref import reference
from benchmarks import harness

TAU = 0.01  # RPO's SD1.5 temperature
# Backends with a fused RPO kernel (fastpref/ops/rpo.py). Another backend would run rpo_loss through
# the PyTorch reference and be timed under a fastpref label, so it is skipped with that reason.
FUSED_RPO_BACKENDS = ("triton",)
EMB_DIM = 768  # CLIP ViT-L/14
SAMPLE_SHAPE = (4, 8, 8)


def missing() -> str | None:
    """Why the RPO benchmark cannot run, or None."""
    if not hasattr(fastpref, "rpo_loss"):
        return "fastpref.rpo_loss does not exist in this fastpref: no RPO rows"
    for name in ("clip_pair_weights_ref", "rpo", "pair_errors"):
        if not hasattr(reference, name):
            return f"fastpref.reference.{name} (the RPO reference) does not exist: no RPO rows"
    return None


@dataclasses.dataclass(frozen=True)
class RpoCase:
    m: int
    dtype: str = "fp32"  # of the latents; embeddings are fp32
    op = "rpo"

    @property
    def pairs(self) -> int:
        return self.m

    @property
    def elements(self) -> int:
        return 2 * self.m * math.prod(SAMPLE_SHAPE)

    def label(self) -> str:
        return f"RPO M={self.m} K={EMB_DIM} {self.dtype}"

    def fields(self) -> dict:
        return {
            "op": self.op, "loss": "sigmoid", "shape": f"M={self.m}", "sample_shape": "×".join(map(str, SAMPLE_SHAPE)),
            "pairs": self.m, "dtype": self.dtype, "target": "full", "ref": "ref_err", "elements": self.elements,
        }  # fmt: skip

    def bytes_moved(self, mode: str) -> int:
        n_s = self.elements * torch.empty((), dtype=harness.DTYPES[self.dtype]).element_size()
        emb = 2 * self.m * EMB_DIM * 4
        return int({"forward": 2 * n_s + emb, "backward": 3 * n_s + emb, "full": 5 * n_s + 2 * emb}[mode])

    def inputs(self, device: torch.device, seed: int = 0) -> dict:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        dt = harness.DTYPES[self.dtype]
        n = 2 * self.m
        target = torch.randn((n, *SAMPLE_SHAPE), generator=g, dtype=dt, device=device)
        ref = target + torch.randn((n, *SAMPLE_SHAPE), generator=g, dtype=dt, device=device)
        model_pred = torch.randn((n, *SAMPLE_SHAPE), generator=g, dtype=dt, device=device).mul_(0.3).add_(ref)
        emb = torch.randn((2, self.m, EMB_DIM), generator=g, device=device)
        return {
            "model_pred": model_pred.requires_grad_(True),
            "target": target,
            "ref_err": reference.pair_errors(ref, target),
            "win_emb": emb[0],
            "lose_emb": emb[1],
        }

    def eager(self):
        def rpo_eager(model_pred, target, ref_err, win_emb, lose_emb):
            weights = reference.clip_pair_weights_ref(win_emb, lose_emb, TAU)
            return reference.rpo(reference.pair_errors(model_pred, target), ref_err, weights, harness.BETA).mean()

        return rpo_eager

    def fastpref(self, backend: str):
        if backend not in FUSED_RPO_BACKENDS:
            raise NotImplementedError(f"no fused RPO kernel for backend={backend!r} (it would time the reference)")
        return functools.partial(_rpo, backend=backend)


def _rpo(model_pred, target, ref_err, win_emb, lose_emb, *, backend):
    return fastpref.rpo_loss(
        model_pred, None, target, ref_err=ref_err, win_emb=win_emb, lose_emb=lose_emb, tau=TAU, beta=harness.BETA,
        backend=backend,
    )  # fmt: skip


def run(ms, providers, device, facts, *, modes, timing, memory, skipped, log=print) -> tuple[list[dict], str | None]:
    """``(rows, reason)``: rows for every M in ``ms``, or no rows and why."""
    why = missing()
    if why:
        return [], why
    rows = []
    for m in ms:
        case = RpoCase(m)
        rows += harness.run_case(case, providers, device, facts, modes=modes, timing=timing, memory=memory, skipped=skipped)
        log(f"{case.label()}: " + ", ".join(f"{r['provider']} {r['ms_median']:.3g} ms" for r in rows if r["pairs"] == m and r["mode"] == "full"))
    return rows, None
