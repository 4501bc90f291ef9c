"""Diffusion-RPO's weighted pairwise matrix, fused (Triton); the cross-rank gather is in
:mod:`fastpref.ops.distributed`.

Math (Diffusion-RPO, Gu et al., 2024, arXiv:2406.06382, eq. 9; the readable form is
:func:`fastpref.reference.rpo`)::

    s_ij = −d_ij/τ = (cos(a_i, b_j) − 1)/τ           a_i, b_j: winner / loser embeddings (normalised)
    W_ij = exp(s_ij − lse_i),  lse_i = log Σ_j exp(s_ij)               (row-normalised, no gradient)
    u_ij = x_i − y_j           x_i = −½β(e_θ[w_i] − e_ref[w_i]), y_j = −½β(e_θ[l_j] − e_ref[l_j])   (RPO)
                               x_i = log odds(e_θ[w_i]),          y_j = log odds(e_θ[l_j])         (ORRPO)
    ℓ_i  = Σ_j W_ij·softplus(−u_ij)                     weights outside log σ (eq. 9)
    ℓ_i  = (1/N)·Σ_j softplus(−W_ij·u_ij)               weights inside (eq. 15, WEIGHT_INSIDE)

The per-sample errors come from the pair-error kernel (:func:`fastpref.ops.pair_loss.fused_pair_errors`);
the x/y transform is chosen by the ``LOSS`` constexpr with the ids of :data:`pair_loss.LOSS_IDS`
(``sigmoid`` = RPO, ``orpo`` = ORRPO). Two kernels, flash-attention style, nothing M×N in memory:

1. ``_rpo_rows_fwd_kernel`` — grid (M / BLOCK_I). For a block of winners, one sweep over tiles of
   losers: cosines by ``tl.dot`` (fp32, ``ieee`` precision — τ = 0.01 turns a TF32 rounding of 1e-3 in
   a cosine into a 10 % error in a weight), an online row max / rescaled sum (the softmax trick), and
   the running weighted loss and ∂ℓ_i/∂x_i. Writes ℓ_i, ∂ℓ_i/∂e_θ[w_i] and lse_i: O(M) bytes.
   Weights inside need the final W_ij, so that variant sweeps twice (normaliser, then loss).
2. ``_rpo_cols_bwd_kernel`` — grid (N / BLOCK_J). For a block of losers, one sweep over tiles of
   winners recomputing W_ij from lse_i: ``∂L/∂e_θ[l_j] = Σ_i g_i·W_ij·σ(−u_ij)·∂y_j/∂e_θ[l_j]`` with
   the upstream per-row gradient g (so ``reduction="none"`` with any weights is exact).

Work: 2·M·N·K multiply-adds forward (3 sweeps of cosines with the backward) and O((M + N)·K) bytes
read per tile row; given ``weights`` the kernels read W instead of computing cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastpref.ops.distributed import gather_constant, gather_losers  # re-exported
from fastpref.ops.family import LOSS_IDS, interpreter_enabled
from fastpref.ops.pair_loss import _log1p, _orpo_log_odds_and_grad, _sigmoid

__all__ = ["RPO_KINDS", "rpo_launch_config", "fused_rpo_rows", "gather_losers", "gather_constant"]

#: the error → logit transforms the RPO kernels support, by their pair-loss id
RPO_KINDS = ("sigmoid", "orpo")


@triton.jit
def _rpo_logit(e, r, beta, LOSS: tl.constexpr):
    """x (or y) of one sample from its errors, and ∂x/∂e_θ."""
    if LOSS == 6:  # orpo: the log-odds of log p = −½βe
        x, dx = _orpo_log_odds_and_grad(e, beta)
    else:  # sigmoid (RPO): the implicit reward −½β(e_θ − e_ref)
        x = -0.5 * beta * (e - r)
        dx = tl.zeros_like(e) - 0.5 * beta
    return x, dx


@triton.jit
def _neg_logsigmoid_and_sigmoid(u):
    """softplus(−u) = −log σ(u) and σ(−u) sharing one exp (the M×N inner loop is exp-bound)."""
    e = tl.exp(-tl.abs(u))
    inv = 1.0 / (1.0 + e)
    return tl.where(u > 0.0, 0.0, -u) + _log1p(e), tl.where(u > 0.0, e * inv, inv)


@triton.jit
def _rpo_scores(win_ptr, lose_ptr, i, j, mi, mj, K, stride_a, stride_b, inv_tau,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """s_ij = (cos − 1)/τ of a tile (unit-norm rows); −inf outside the valid columns."""
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        a = tl.load(win_ptr + i[:, None] * stride_a + k[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        b = tl.load(lose_ptr + j[:, None] * stride_b + k[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    return tl.where(mj[None, :], (acc - 1.0) * inv_tau, float("-inf"))


@triton.jit
def _rpo_rows_fwd_kernel(
    mw_ptr,  # (M,) fp32 e_θ of this block's winners
    rw_ptr,  # (M,) fp32 e_ref of the winners (0 for ORRPO)
    ml_ptr,  # (N,) fp32 e_θ of all losers (all ranks)
    rl_ptr,  # (N,) fp32 e_ref of all losers
    win_ptr,  # (M, K) fp32 unit-norm winner embeddings (FROM_EMB)
    lose_ptr,  # (N, K) fp32 unit-norm loser embeddings (FROM_EMB)
    w_ptr,  # (M, N) weights (not FROM_EMB), row stride stride_w, unit column stride
    rows_ptr,  # (M,) fp32 out: ℓ_i
    dl_dmw_ptr,  # (M,) fp32 out: ∂ℓ_i/∂e_θ[w_i]
    lse_ptr,  # (M,) fp32 out: log Σ_j exp(s_ij) (FROM_EMB)
    M,
    N,
    K,
    stride_a,
    stride_b,
    stride_w,
    inv_tau,
    beta,
    inv_N,  # 1/N: the mean over columns of the weights-inside form
    LOSS: tl.constexpr,
    FROM_EMB: tl.constexpr,
    WEIGHT_INSIDE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = i < M
    x, dx = _rpo_logit(tl.load(mw_ptr + i, mask=mi, other=0.0), tl.load(rw_ptr + i, mask=mi, other=0.0), beta, LOSS)
    row_max = tl.full([BLOCK_I], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_I], dtype=tl.float32)
    loss = tl.zeros([BLOCK_I], dtype=tl.float32)
    grad = tl.zeros([BLOCK_I], dtype=tl.float32)  # Σ_j (weight)·∂ℓ_ij/∂x_i
    if FROM_EMB and WEIGHT_INSIDE:  # first sweep: the row normaliser alone (online max and sum)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            s = _rpo_scores(win_ptr, lose_ptr, i, j, mi, j < N, K, stride_a, stride_b, inv_tau, BLOCK_I, BLOCK_J, BLOCK_K)
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
            row_max = new_max
        lse = row_max + tl.log(row_sum)
    else:
        lse = tl.zeros([BLOCK_I], dtype=tl.float32)  # set after the sweep (online), unused (weights given)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < N
        y, _ = _rpo_logit(tl.load(ml_ptr + j, mask=mj, other=0.0), tl.load(rl_ptr + j, mask=mj, other=0.0), beta, LOSS)
        u = x[:, None] - y[None, :]
        if FROM_EMB:
            s = _rpo_scores(win_ptr, lose_ptr, i, j, mi, mj, K, stride_a, stride_b, inv_tau, BLOCK_I, BLOCK_J, BLOCK_K)
        if WEIGHT_INSIDE:
            if FROM_EMB:
                w = tl.exp(s - lse[:, None])
            else:
                w = tl.load(w_ptr + i[:, None] * stride_w + j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
                w = w.to(tl.float32)
            sp, sig = _neg_logsigmoid_and_sigmoid(w * u)  # softplus(0) ≠ 0: mask the columns
            loss += tl.sum(tl.where(mj[None, :], sp, 0.0), axis=1) * inv_N
            grad -= tl.sum(tl.where(mj[None, :], w * sig, 0.0), axis=1) * inv_N
        elif FROM_EMB:  # online: rescale the running sums whenever the row max grows
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            alpha = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])  # 0 in the masked columns (s = −inf; y = finite there)
            sp, sig = _neg_logsigmoid_and_sigmoid(u)
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            loss = loss * alpha + tl.sum(p * sp, axis=1)
            grad = grad * alpha - tl.sum(p * sig, axis=1)
            row_max = new_max
        else:  # w = 0 in the masked columns
            w = tl.load(w_ptr + i[:, None] * stride_w + j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
            w = w.to(tl.float32)
            sp, sig = _neg_logsigmoid_and_sigmoid(u)
            loss += tl.sum(w * sp, axis=1)
            grad -= tl.sum(w * sig, axis=1)
    if FROM_EMB and not WEIGHT_INSIDE:
        loss = loss / row_sum
        grad = grad / row_sum
        lse = row_max + tl.log(row_sum)
    tl.store(rows_ptr + i, loss, mask=mi)
    tl.store(dl_dmw_ptr + i, grad * dx, mask=mi)
    tl.store(lse_ptr + i, lse, mask=mi)


@triton.jit
def _rpo_cols_bwd_kernel(
    mw_ptr,  # (M,) fp32 e_θ of the winners
    rw_ptr,  # (M,) fp32 e_ref of the winners
    ml_ptr,  # (N,) fp32 e_θ of the losers
    rl_ptr,  # (N,) fp32 e_ref of the losers
    win_ptr,  # (M, K) fp32 unit-norm winner embeddings (FROM_EMB)
    lose_ptr,  # (N, K) fp32 unit-norm loser embeddings (FROM_EMB)
    w_ptr,  # (M, N) weights (not FROM_EMB)
    lse_ptr,  # (M,) fp32 row log-normalisers from the forward
    grad_rows_ptr,  # (M,) fp32 upstream gradient g_i of ℓ_i
    dl_dml_ptr,  # (N,) fp32 out: Σ_i g_i·∂ℓ_i/∂e_θ[l_j]
    M,
    N,
    K,
    stride_a,
    stride_b,
    stride_w,
    inv_tau,
    beta,
    inv_N,
    LOSS: tl.constexpr,
    FROM_EMB: tl.constexpr,
    WEIGHT_INSIDE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mj = j < N
    y, dy = _rpo_logit(tl.load(ml_ptr + j, mask=mj, other=0.0), tl.load(rl_ptr + j, mask=mj, other=0.0), beta, LOSS)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for i0 in range(0, M, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < M
        x, _ = _rpo_logit(tl.load(mw_ptr + i, mask=mi, other=0.0), tl.load(rw_ptr + i, mask=mi, other=0.0), beta, LOSS)
        g = tl.load(grad_rows_ptr + i, mask=mi, other=0.0)
        u = x[:, None] - y[None, :]
        if FROM_EMB:
            s = _rpo_scores(win_ptr, lose_ptr, i, j, mi, mj, K, stride_a, stride_b, inv_tau, BLOCK_I, BLOCK_J, BLOCK_K)
            w = tl.exp(s - tl.load(lse_ptr + i, mask=mi, other=0.0)[:, None])
        else:
            w = tl.load(w_ptr + i[:, None] * stride_w + j[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
            w = w.to(tl.float32)
        if WEIGHT_INSIDE:  # ∂softplus(−W(x − y))/∂y = W·σ(−W·u)
            dy_tile = w * _sigmoid(-w * u) * inv_N
        else:  # ∂(W·softplus(−(x − y)))/∂y = W·σ(−u)
            dy_tile = w * _sigmoid(-u)
        acc += tl.sum(g[:, None] * dy_tile, axis=0)  # g = 0 in masked rows, w = 0 in masked columns
    tl.store(dl_dml_ptr + j, acc * dy, mask=mj)


def rpo_launch_config(m: int, n: int, k: int, device: torch.device):
    """``(BLOCK_I, BLOCK_J, BLOCK_K, num_warps)``. On a GPU 32×32 tiles and 16-wide K chunks: fp32
    operands with ``ieee`` dot products run on the FMA units; 64×64×64 tiles spilled 1–2 KB per thread
    on sm_80 (255 registers), 32×32×32 still 8 bytes in one variant on sm_90; 32×32×16 none
    (``tests/_aot_compile.py`` checks every variant on sm_80 and sm_90). In the interpreter, where
    every tl op costs ~0.3 ms per program whatever its width, up to 512×512 tiles. tl.dot needs every
    dim ≥ 16."""
    if device.type == "cuda" and not interpreter_enabled():
        return 32, 32, 16, 4
    return (max(16, min(512, triton.next_power_of_2(m))), max(16, min(512, triton.next_power_of_2(n))),
            max(16, min(1024, triton.next_power_of_2(k))), 4)  # fmt: skip


def _f32(x):
    return x.detach().to(torch.float32).contiguous()


class RPORows(torch.autograd.Function):
    """``(e_θ[w] (M,), e_θ[l] (N,), e_ref[w], e_ref[l], weights | embeddings) → ℓ (M,)``; gradients
    flow to e_θ of the winners (stored by the forward) and of the losers (the column kernel)."""

    @staticmethod
    def forward(ctx, mw, ml, rw, rl, weights, win_emb, lose_emb, kind, tau, beta, weight_inside):
        m, n = mw.shape[0], ml.shape[0]
        from_emb = weights is None
        dev = mw.device
        mw32, ml32, rw32, rl32 = _f32(mw), _f32(ml), _f32(rw), _f32(rl)
        if from_emb:  # unit rows once, O((M + N)·K); the kernels take the dot products
            a = F.normalize(win_emb.detach().to(torch.float32), dim=1).contiguous()
            b = F.normalize(lose_emb.detach().to(torch.float32), dim=1).contiguous()
            w = mw32  # unused pointer
            k = a.shape[1]
        else:
            w = weights.detach().to(torch.float32)  # one (M, N) fp32 operand, whatever the user's dtype
            if w.stride(1) != 1:
                w = w.contiguous()
            a = b = mw32  # unused pointers
            k = 1
        cfg = rpo_launch_config(m, n, k, dev)
        bi, bj, bk, num_warps = cfg
        rows = torch.empty(m, dtype=torch.float32, device=dev)
        dl_dmw = torch.empty(m, dtype=torch.float32, device=dev)
        lse = torch.empty(m, dtype=torch.float32, device=dev)
        args = (m, n, k, a.stride(0), b.stride(0), w.stride(0), 1.0 / tau if from_emb else 1.0, beta, 1.0 / n)
        meta = dict(LOSS=LOSS_IDS[kind], FROM_EMB=from_emb, WEIGHT_INSIDE=weight_inside, BLOCK_I=bi, BLOCK_J=bj,
                    BLOCK_K=bk, num_warps=num_warps)  # fmt: skip
        _rpo_rows_fwd_kernel[(triton.cdiv(m, bi),)](mw32, rw32, ml32, rl32, a, b, w, rows, dl_dmw, lse, *args, **meta)
        ctx.save_for_backward(mw32, rw32, ml32, rl32, a, b, w, lse, dl_dmw)
        ctx.args, ctx.meta, ctx.grid = args, meta, (triton.cdiv(n, bj),)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        mw32, rw32, ml32, rl32, a, b, w, lse, dl_dmw = ctx.saved_tensors
        g = grad_rows.to(torch.float32).contiguous()
        grad_mw = grad_ml = None
        if ctx.needs_input_grad[0]:
            grad_mw = g * dl_dmw
        if ctx.needs_input_grad[1]:
            grad_ml = torch.empty_like(ml32)
            _rpo_cols_bwd_kernel[ctx.grid](mw32, rw32, ml32, rl32, a, b, w, lse, g, grad_ml, *ctx.args, **ctx.meta)
        return grad_mw, grad_ml, None, None, None, None, None, None, None, None, None


@torch.compiler.disable
def fused_rpo_rows(kind, mw, ml, rw, rl, weights, win_emb, lose_emb, *, tau, beta, weight_inside):
    """Per-row losses ``ℓ_i = Σ_j W_ij·softplus(−(x_i − y_j))`` (or weights inside), fused; see the
    module docstring. ``kind``: ``"sigmoid"`` (RPO) or ``"orpo"`` (ORRPO, without its SFT term)."""
    return RPORows.apply(mw, ml, rw, rl, weights, win_emb, lose_emb, kind, tau, beta, weight_inside)
