"""Fused pair-error + preference-loss kernel family (Triton).

Math (the readable form, with the conventions, is :mod:`fastpref.reference`; ``docs/losses.md``)::

    e_θ[k]   = mean_S (model_pred[k] − target[k])²        k = 0 … 2B−1 (winners, then losers)
    e_ref[k] = mean_S (ref_pred[k]   − target[k])²        (or a precomputed ref_err)
    u_i      = −½·β·((e_θ[w_i] − e_θ[l_i]) − (e_ref[w_i] − e_ref[l_i]))
    ℓ_i      = ℓ(u_i)            sigmoid / hinge / ipo / dmpo / dro, chosen by the LOSS constexpr
               ℓ(e_θ[w_i], e_θ[l_i])   mapo / orpo (reference-free)
    ℓ_k      = ℓ(e_θ[k], e_ref[k], y_k, z)   kto: unpaired rows, any N (row p + B absent when ≥ N)
    ∂ℓ_i/∂model_pred[k] = ∂ℓ_i/∂e_θ[k] · 2·(model_pred[k] − target[k]) / D

Three launches per training step:

1. ``_pair_err_fwd_kernel`` — grid (B, SPLITS). Program (i, s) reads split s of the winner and loser
   rows of ``model_pred``, ``ref_pred`` and ``target`` (the target row once when it is shared) and
   writes four fp32 partial sums of squares. Splitting S keeps a GPU busy when 2B is small (8–32
   samples of 16 K–1 M elements); partials, not atomics, keep the result bit-reproducible.
2. ``_pair_loss_finalize_kernel`` — one program: sums the partials in a fixed order, computes the
   errors, u, ℓ, ∂ℓ/∂e_θ and the reduced loss. Touches O(B·SPLITS) bytes.
3. ``_pair_err_bwd_kernel`` — grid (B, SPLITS): re-reads ``model_pred`` and ``target`` and writes
   the gradient. Recomputing moves the same bytes as storing the gradient in the forward (Liger
   style: 3N read + N write in forward, N read + N write in backward, against 3N + 3N here) while
   needing no (2B, D) buffer between forward and backward, and never writes into a user's tensor.

Bytes moved with N = 2B·D elements of size s: forward 3N·s (2.5N·s with a shared target, 1.5N·s with
``ref_err``), backward 3N·s (2.5N·s shared). Gradients w.r.t. ``ref_pred``, ``target`` and ``ref_err``
are not computed; the front end refuses inputs that require them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastpref.ops.family import LOSS_IDS, REF_FREE_LOSSES, UNPAIRED_LOSSES, interpreter_enabled

__all__ = [
    "LOSS_IDS",
    "interpreter_enabled",
    "launch_config",
    "pair_err_partials",
    "pair_err_backward",
    "pair_loss_forward",
    "pair_loss_backward",
    "fused_pair_errors",
    "REF_FREE_LOSSES",
    "UNPAIRED_LOSSES",
]

# LOSS_IDS (the LOSS constexpr of the kernels), REF_FREE_LOSSES, UNPAIRED_LOSSES: fastpref.ops.family;
# the per-loss scalars beta, c0, c1: fastpref.ops.family.kernel_scalars.

# Largest per-sample size addressed with int32 column offsets; row offsets are int64, so the
# whole tensor may exceed 2**31 elements (video latents).
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 2**20


# ----------------------------------------------------------------------------------------------
# Numerics shared by the kernels. libdevice is unavailable in the interpreter, so log1p is
# written out; every `where` is arranged so that a NaN input stays NaN.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _log1p(z):
    # Goldberg's log1p: log(w)·z/(w − 1) with w = 1 + z corrects the rounding of 1 + z.
    w = 1.0 + z
    d = w - 1.0
    return tl.where(d == 0.0, z, tl.log(w) * (z / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log1p(exp(−|x|)): finite for |x| = 1e4, NaN stays NaN.
    return tl.where(x < 0.0, 0.0, x) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # σ(x) without overflow: exp of a non-positive number only.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _expm1_neg(x):
    # 1 − e^{−x} for x ≥ 0 without cancellation (Kahan: (v − 1)·z/log v with v = e^z, z = −x)
    v = tl.exp(-x)
    small = x < 0.5  # above, 1 − v has no cancellation (and v may underflow to 0)
    vs = tl.where(small & (v != 1.0), v, 0.5)
    kahan = tl.where(v == 1.0, x, (vs - 1.0) * x / tl.log(vs))
    return tl.where(small, kahan, 1.0 - v)


@triton.jit
def _mapo_f_and_grad(e, s):
    """MaPO's f(e) = y/(e^y − 1), y = s·e, and df/de; a series near 0 (f → 1, f' → −s/2), the
    Kahan form log(w)/(w − 1) with w = e^y in between, y·e^{−y} where e^y would overflow."""
    y = s * e
    y2 = y * y
    w = tl.exp(tl.minimum(y, 60.0))
    f_mid = tl.log(w) / tl.where(w == 1.0, 1.0, w - 1.0)
    f = tl.where(y < 0.1, 1.0 - 0.5 * y + y2 / 12.0 - y2 * y2 / 720.0,
                 tl.where(y > 60.0, y * tl.exp(-y), f_mid))  # fmt: skip
    # φ'(y) = φ·((1 − φ)/y − 1), cancelling near 0: there the series −½ + y/6 − y³/180
    df = tl.where(y < 0.1, -0.5 + y / 6.0 - y2 * y / 180.0, f * ((1.0 - f) / tl.where(y < 0.1, 1.0, y) - 1.0))
    return f, s * df


@triton.jit
def _orpo_log_odds_and_grad(e, beta):
    """log odds = log p − log(1 − p) with log p = −½βe, and its derivative −½β/(1 − p)."""
    x = 0.5 * beta * e
    # 1 − p, floored at 1e-30: a perfect prediction (e = 0) has infinite odds; the floor keeps the
    # log-odds finite (≤ 69) — the reference floors the same way
    q = tl.maximum(_expm1_neg(x), 1e-30)
    # Mächler's log1mexp; each branch evaluated where it is accurate and finite
    log_q = tl.where(x > 0.6931471805599453, _log1p(-tl.exp(-tl.maximum(x, 0.6931471805599453))), tl.log(q))
    return -x - log_q, -0.5 * beta / q


@triton.jit
def _pair_loss_and_grad(mw, ml, rw, rl, beta, c0, c1, LOSS: tl.constexpr):
    """Margin u, ℓ and ∂ℓ/∂e_θ of the winner and of the loser of one pair (paired losses, ids 0–6).

    c0, c1: per-loss constants from the host (:func:`fastpref.ops.family.kernel_scalars`)."""
    if LOSS == 5:  # mapo: u = T·(f(e_w) − f(e_l)), ℓ = e_w + β_M·softplus(−u); c0 = s, c1 = T
        fw, dfw = _mapo_f_and_grad(mw, c0)
        fl, dfl = _mapo_f_and_grad(ml, c0)
        u = c1 * (fw - fl)
        loss = mw + beta * _softplus(-u)
        g = beta * _sigmoid(-u) * c1  # −∂(β_M·softplus(−u))/∂u
        dl_dmw = 1.0 - g * dfw
        dl_dml = g * dfl
    elif LOSS == 6:  # orpo: u = lo(e_w) − lo(e_l), ℓ = e_w + λ·softplus(−u); beta: log p = −½βe, c0 = λ
        lw, dlw = _orpo_log_odds_and_grad(mw, beta)
        ll, dll = _orpo_log_odds_and_grad(ml, beta)
        u = lw - ll
        loss = mw + c0 * _softplus(-u)
        g = c0 * _sigmoid(-u)
        dl_dmw = 1.0 - g * dlw
        dl_dml = g * dll
    else:  # functions of d = Δθ − Δref, u = −½βd
        d = (mw - ml) - (rw - rl)
        u = -0.5 * beta * d
        if LOSS == 0:  # sigmoid: ℓ = softplus(−u), ∂ℓ/∂u = −σ(−u)
            loss = _softplus(-u)
            dl_dd = -_sigmoid(-u) * (-0.5 * beta)
        elif LOSS == 1:  # hinge: ℓ = relu(1 − u), ∂ℓ/∂u = −1[u < 1]
            m = 1.0 - u
            loss = tl.where(m < 0.0, 0.0, m)
            dl_dd = tl.where(u < 1.0, -1.0, 0.0) * (-0.5 * beta)
        elif LOSS == 2:  # ipo: ℓ = (h − c0)², h = −d, c0 = 1/(2β)
            r = -d - c0
            loss = r * r
            dl_dd = -2.0 * r
        elif LOSS == 3:  # dmpo: c0 = log(1 − α), c1 = log α; ∂ℓ/∂u = σ(u)σ(−u)(u − log((1−α)/α))
            s_pos = _sigmoid(u)
            s_neg = _sigmoid(-u)
            loss = s_pos * (-_softplus(-u) - c0) + s_neg * (-_softplus(u) - c1)
            dl_dd = s_pos * s_neg * (u - (c0 - c1)) * (-0.5 * beta)
        else:  # dro (host passes β = 2, so u = −d): ℓ = relu(d + m) = relu(c0 − u), c0 = m
            m = c0 - u
            loss = tl.where(m < 0.0, 0.0, m)
            dl_dd = tl.where(u < c0, 1.0, 0.0)
        dl_dmw = dl_dd
        dl_dml = -dl_dd
    return u, loss, dl_dmw, dl_dml


@triton.jit
def _kto_row_loss_and_grad(m, r, y, z, beta, c0, c1):
    """KTO for one row: x = β·(g − z), g = e_ref − e_θ; ℓ = λ_y·σ(−(2y−1)·x) (= λ_y·(1 − σ(±x)));
    ∂ℓ/∂e_θ = λ_y·σ(t)σ(−t)·(2y−1)·β with t = (2y−1)·x. c0 = λ_desirable, c1 = λ_undesirable."""
    desirable = y != 0.0
    sign = tl.where(desirable, 1.0, -1.0)
    lam = tl.where(desirable, c0, c1)
    x = beta * ((r - m) - z)
    t = sign * x
    s_neg = _sigmoid(-t)
    return x, lam * s_neg, lam * _sigmoid(t) * s_neg * sign * beta


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pair_err_fwd_kernel(
    model_ptr,  # (2B, D) model_pred rows, unit column stride, row stride stride_m
    ref_ptr,  # (2B, D) ref_pred rows (read only when HAS_REF)
    target_ptr,  # (2B, D) target rows, or (B, D) when SHARED_TARGET
    partial_ptr,  # (2, 2B, SPLITS) fp32 out: Σ(model − target)², Σ(ref − target)² per split
    B,  # number of pairs (programs along axis 0)
    N,  # number of rows: 2B, or for unpaired losses any N ≤ 2B (row pair + B absent when ≥ N)
    D,  # elements per sample
    CHUNK,  # elements per split, a multiple of BLOCK
    stride_m,
    stride_r,
    stride_t,
    SPLITS: tl.constexpr,
    HAS_REF: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # int64 row offsets: the tensor may exceed 2**31
    split = tl.program_id(1)
    win = pair
    lose = pair + B
    has_lose = lose < N
    t_lose = pair if SHARED_TARGET else lose
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, D)
    cols = tl.arange(0, BLOCK)

    acc_mw = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ml = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rw = tl.zeros([BLOCK], dtype=tl.float32)
    acc_rl = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + cols
        mask = idx < end
        lmask = mask & has_lose
        # load in the storage dtype, do all math in fp32 (bf16 math is wrong in the interpreter
        # and imprecise everywhere)
        tw = tl.load(target_ptr + win * stride_t + idx, mask=mask, other=0.0).to(tl.float32)
        if SHARED_TARGET:
            tlo = tw
        else:
            tlo = tl.load(target_ptr + t_lose * stride_t + idx, mask=lmask, other=0.0).to(tl.float32)
        dw = tl.load(model_ptr + win * stride_m + idx, mask=mask, other=0.0).to(tl.float32) - tw
        dl = tl.load(model_ptr + lose * stride_m + idx, mask=lmask, other=0.0).to(tl.float32) - tlo
        acc_mw += dw * dw
        acc_ml += dl * dl
        if HAS_REF:
            rw = tl.load(ref_ptr + win * stride_r + idx, mask=mask, other=0.0).to(tl.float32) - tw
            rl = tl.load(ref_ptr + lose * stride_r + idx, mask=lmask, other=0.0).to(tl.float32) - tlo
            acc_rw += rw * rw
            acc_rl += rl * rl

    tl.store(partial_ptr + win * SPLITS + split, tl.sum(acc_mw, axis=0))
    tl.store(partial_ptr + lose * SPLITS + split, tl.sum(acc_ml, axis=0), mask=has_lose)
    if HAS_REF:
        ref_plane = N * SPLITS
        tl.store(partial_ptr + ref_plane + win * SPLITS + split, tl.sum(acc_rw, axis=0))
        tl.store(partial_ptr + ref_plane + lose * SPLITS + split, tl.sum(acc_rl, axis=0), mask=has_lose)


@triton.jit
def _load_errors(partial_ptr, ref_err_ptr, i, B, N, inv_D, m, ml,
                 HAS_REF: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):  # fmt: skip
    """e_θ and e_ref of rows i and i + B from the split partial sums (summed in a fixed order)."""
    splits = tl.arange(0, SPLITS_P2)
    split_mask = splits < SPLITS
    w_off = i[:, None] * SPLITS + splits[None, :]
    l_off = (i[:, None] + B) * SPLITS + splits[None, :]
    mw2 = m[:, None] & split_mask[None, :]
    ml2 = ml[:, None] & split_mask[None, :]
    mw = tl.sum(tl.load(partial_ptr + w_off, mask=mw2, other=0.0), axis=1) * inv_D
    mlo = tl.sum(tl.load(partial_ptr + l_off, mask=ml2, other=0.0), axis=1) * inv_D
    if HAS_REF:
        ref_plane = N * SPLITS
        rw = tl.sum(tl.load(partial_ptr + ref_plane + w_off, mask=mw2, other=0.0), axis=1) * inv_D
        rl = tl.sum(tl.load(partial_ptr + ref_plane + l_off, mask=ml2, other=0.0), axis=1) * inv_D
    else:
        rw = tl.load(ref_err_ptr + i, mask=m, other=0.0).to(tl.float32)
        rl = tl.load(ref_err_ptr + B + i, mask=ml, other=0.0).to(tl.float32)
    return mw, mlo, rw, rl


@triton.jit
def _pair_loss_finalize_kernel(
    partial_ptr,  # (2, N, SPLITS) fp32 partial sums from _pair_err_fwd_kernel
    ref_err_ptr,  # (N,) precomputed reference errors (read only when not HAS_REF)
    label_ptr,  # (N,) fp32 labels, 1 = desirable (read only by the unpaired loss, kto)
    err_ptr,  # (2, N) fp32 out: e_θ, e_ref
    u_ptr,  # (B,) fp32 out: margin u_i — (N,) for kto: β·(g_k − z)
    loss_ptr,  # (B,) fp32 out: ℓ_i — (N,) for kto
    dl_de_ptr,  # (N,) fp32 out: ∂ℓ/∂e_θ[k] of the pair (or row) k belongs to
    total_ptr,  # (2,) fp32 out: scale · Σ ℓ, and kto's reference point z
    B,  # pairs; for kto ceil(N/2) (row i + B is the second row handled with row i)
    N,  # rows
    inv_D,  # 1 / D
    beta,
    c0,  # per-loss constants, see _pair_loss_and_grad
    c1,
    scale,  # 1/B (1/N for kto) for reduction="mean", else 1
    LOSS: tl.constexpr,
    HAS_REF: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    UNPAIRED: tl.constexpr = LOSS == 7
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    z = 0.0
    if UNPAIRED:  # kto's reference point z = max(0, mean_k (e_ref − e_θ)[k]): one extra sweep
        g_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for start in range(0, B, BLOCK_B):
            i = start + tl.arange(0, BLOCK_B)
            m = i < B
            ml = m & (i + B < N)
            mw, mlo, rw, rl = _load_errors(partial_ptr, ref_err_ptr, i, B, N, inv_D, m, ml, HAS_REF, SPLITS, SPLITS_P2)
            g_sum += tl.where(m, rw - mw, 0.0) + tl.where(ml, rl - mlo, 0.0)
        z = tl.maximum(tl.sum(g_sum, axis=0) / N, 0.0)
    for start in range(0, B, BLOCK_B):
        i = start + tl.arange(0, BLOCK_B)
        m = i < B
        ml = m & (i + B < N)
        mw, mlo, rw, rl = _load_errors(partial_ptr, ref_err_ptr, i, B, N, inv_D, m, ml, HAS_REF, SPLITS, SPLITS_P2)
        tl.store(err_ptr + i, mw, mask=m)
        tl.store(err_ptr + B + i, mlo, mask=ml)
        tl.store(err_ptr + N + i, rw, mask=m)
        tl.store(err_ptr + N + B + i, rl, mask=ml)
        if UNPAIRED:
            yw = tl.load(label_ptr + i, mask=m, other=0.0)
            yl = tl.load(label_ptr + B + i, mask=ml, other=0.0)
            uw, lw, gw = _kto_row_loss_and_grad(mw, rw, yw, z, beta, c0, c1)
            ul, ll, gl = _kto_row_loss_and_grad(mlo, rl, yl, z, beta, c0, c1)
            tl.store(u_ptr + i, uw, mask=m)
            tl.store(u_ptr + B + i, ul, mask=ml)
            tl.store(loss_ptr + i, lw, mask=m)
            tl.store(loss_ptr + B + i, ll, mask=ml)
            tl.store(dl_de_ptr + i, gw, mask=m)
            tl.store(dl_de_ptr + B + i, gl, mask=ml)
            total += tl.where(m, lw, 0.0) + tl.where(ml, ll, 0.0)
        else:
            u, loss, dl_dmw, dl_dml = _pair_loss_and_grad(mw, mlo, rw, rl, beta, c0, c1, LOSS)
            tl.store(u_ptr + i, u, mask=m)
            tl.store(loss_ptr + i, loss, mask=m)
            tl.store(dl_de_ptr + i, dl_dmw, mask=m)
            tl.store(dl_de_ptr + B + i, dl_dml, mask=m)
            total += tl.where(m, loss, 0.0)
    tl.store(total_ptr, tl.sum(total, axis=0) * scale)
    tl.store(total_ptr + 1, z)


@triton.jit
def _pair_err_bwd_kernel(
    model_ptr,  # (2B, D) model_pred rows (re-read: the gradient is recomputed, not stored)
    target_ptr,  # (2B, D) or shared (B, D) target rows
    grad_ptr,  # (2B, D) out: ∂L/∂model_pred, contiguous, model_pred's dtype
    dl_de_ptr,  # (2B,) fp32 ∂ℓ/∂e_θ[k] of the pair (or sample) k belongs to
    grad_out_ptr,  # (1,) or (B,) upstream gradient of the loss — (N,) when UNPAIRED
    B,
    N,  # rows (2B for pairs; unpaired: row pair + B is absent when ≥ N)
    D,
    CHUNK,
    stride_m,
    stride_t,
    coef,  # 2/D · (1/B for "mean")
    GRAD_PER_PAIR: tl.constexpr,  # reduction="none": one upstream gradient per pair (per row)
    SHARED_TARGET: tl.constexpr,
    UNPAIRED: tl.constexpr,  # kto: rows are independent samples, grad_out is per row
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    win = pair
    lose = pair + B
    has_lose = lose < N
    t_lose = pair if SHARED_TARGET else lose
    if GRAD_PER_PAIR:
        g = tl.load(grad_out_ptr + pair).to(tl.float32) * coef
        if UNPAIRED:
            g_lose = tl.load(grad_out_ptr + lose, mask=has_lose, other=0.0).to(tl.float32) * coef
        else:
            g_lose = g
    else:
        g = tl.load(grad_out_ptr).to(tl.float32) * coef
        g_lose = g
    cw = g * tl.load(dl_de_ptr + win)
    cl = g_lose * tl.load(dl_de_ptr + lose, mask=has_lose, other=0.0)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, D)
    cols = tl.arange(0, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + cols
        mask = idx < end
        lmask = mask & has_lose
        tw = tl.load(target_ptr + win * stride_t + idx, mask=mask, other=0.0).to(tl.float32)
        if SHARED_TARGET:
            tlo = tw
        else:
            tlo = tl.load(target_ptr + t_lose * stride_t + idx, mask=lmask, other=0.0).to(tl.float32)
        pw = tl.load(model_ptr + win * stride_m + idx, mask=mask, other=0.0).to(tl.float32)
        pl = tl.load(model_ptr + lose * stride_m + idx, mask=lmask, other=0.0).to(tl.float32)
        gw = cw * (pw - tw)
        gl = cl * (pl - tlo)
        tl.store(grad_ptr + win * D + idx, gw.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + lose * D + idx, gl.to(grad_ptr.dtype.element_ty), mask=lmask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    # queried on first launch, never at import
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(num_pairs: int, numel: int, device: torch.device, num_splits: int | None = None,
                  element_size: int = 2):
    """Pick ``(BLOCK, num_warps, splits, chunk)`` for B pairs of ``numel`` elements per sample.

    On a GPU: 8 warps and a block of one 16-byte vector per thread and tensor (2048 bf16/fp16, 1024
    fp32 elements), so every streamed tensor is read with one 128-bit load per thread per iteration and
    the forward stays within 64 registers: 4 programs resident per SM (``tests/_aot_compile.py``
    checks both on sm_80 and sm_90). Splits of S: as many as fill one wave of 4 programs per SM
    without a partial second wave, each at least two blocks long (the reasoning, with a roofline
    model: ``benchmarks/roofline.py``).
    In the interpreter every tl op costs ~0.3 ms per program whatever its width, so one wide block per
    sample and no splits. ``num_splits`` overrides the split count (tests use it to cover the split
    path on the CPU); ``element_size`` is the bytes per element of the streamed tensors.
    """
    if device.type == "cuda" and not interpreter_enabled():
        num_warps = 8
        block = 32 * num_warps * 16 // element_size
        if num_splits is None:
            # one full wave: B·splits ≤ 4·SMs resident programs, never a partial second wave
            slots = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            num_splits = max(1, min(slots // num_pairs, triton.cdiv(numel, 2 * block)))
    else:
        block, num_warps = min(triton.next_power_of_2(numel), 16384), 4
        num_splits = num_splits or 1
    chunk = triton.cdiv(triton.cdiv(numel, num_splits), block) * block
    splits = triton.cdiv(numel, chunk)  # no empty splits
    return block, num_warps, splits, chunk


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``(n, D)`` rows with unit column stride: a view when the sample dims are
    contiguous (any row stride, e.g. a slice of a larger batch), one explicit copy otherwise."""
    x2 = x.reshape(n, -1)
    return x2 if x2.stride(1) == 1 or x2.shape[1] == 1 else x2.contiguous()


def pair_err_partials(model2d, ref2d, target2d, num_pairs, cfg):
    """Launch the forward kernel: ``(2, N, SPLITS)`` fp32 partial sums of squares (N rows; for
    unpaired rows ``num_pairs = ceil(N/2)`` programs each take rows p and p + num_pairs)."""
    block, num_warps, splits, chunk = cfg
    n, numel = model2d.shape
    shared = target2d.shape[0] != n
    has_ref = ref2d is not None
    partial = torch.empty((2, n, splits), dtype=torch.float32, device=model2d.device)
    ref_arg = ref2d if has_ref else model2d
    _pair_err_fwd_kernel[(num_pairs, splits)](
        model2d, ref_arg, target2d, partial,
        num_pairs, n, numel, chunk,
        model2d.stride(0), ref_arg.stride(0), target2d.stride(0),
        SPLITS=splits, HAS_REF=has_ref, SHARED_TARGET=shared, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return partial


def pair_err_backward(model2d, target2d, dl_de, grad_out, coef, num_pairs, cfg, unpaired=False):
    """Launch the backward kernel: ``grad[k] = grad_out · coef · dl_de[k] · (model[k] − target[k])``."""
    block, num_warps, splits, chunk = cfg
    n, numel = model2d.shape
    grad = torch.empty((n, numel), dtype=model2d.dtype, device=model2d.device)
    grad_out = grad_out.to(torch.float32).contiguous()
    _pair_err_bwd_kernel[(num_pairs, splits)](
        model2d, target2d, grad, dl_de, grad_out,
        num_pairs, n, numel, chunk, model2d.stride(0), target2d.stride(0), coef,
        GRAD_PER_PAIR=grad_out.numel() > 1, SHARED_TARGET=target2d.shape[0] != n, UNPAIRED=unpaired,
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad


def pair_loss_forward(model_pred, ref_pred, target, ref_err, labels, loss, beta, c0, c1, reduction, num_splits=None):
    """The forward launches on validated inputs: ``(loss, margin, errors, dl_de)``.

    ``loss`` is the reduced (or per-pair / per-row) loss, margin u ``(B,)`` (``(N,)`` for kto), the
    ``(2, N)`` fp32 errors (e_θ, e_ref; e_ref = 0 for reference-free losses) and ``dl_de`` ``(N,)``,
    ∂ℓ/∂e_θ per row — all :func:`pair_loss_backward` needs besides ``model_pred`` and ``target``.
    Called by the ``torch.library`` op ``fastpref::triton_pair_loss_fwd`` (:mod:`fastpref.ops.library`),
    which adds autograd and the fake implementation.
    """
    n = model_pred.shape[0]
    num_pairs = (n + 1) // 2
    num_items = n if loss in UNPAIRED_LOSSES else num_pairs  # what "mean" averages over
    model2d = _rows(model_pred, n)
    target2d = _rows(target, target.shape[0])
    ref2d = _rows(ref_pred, n) if ref_pred is not None else None
    numel = model2d.shape[1]
    cfg = launch_config(num_pairs, numel, model2d.device, num_splits, model2d.element_size())
    partial = pair_err_partials(model2d, ref2d, target2d, num_pairs, cfg)

    dev = model2d.device
    if ref2d is None and ref_err is None:  # reference-free: e_ref reads as 0
        ref_err = torch.zeros(n, dtype=torch.float32, device=dev)
    err = torch.empty((2, n), dtype=torch.float32, device=dev)
    u = torch.empty(num_items, dtype=torch.float32, device=dev)
    losses = torch.empty(num_items, dtype=torch.float32, device=dev)
    dl_de = torch.empty(n, dtype=torch.float32, device=dev)
    total = torch.empty(2, dtype=torch.float32, device=dev)
    splits = cfg[2]
    splits_p2 = triton.next_power_of_2(splits)
    _pair_loss_finalize_kernel[(1,)](
        partial, ref_err if ref_err is not None else partial, labels if labels is not None else partial,
        err, u, losses, dl_de, total,
        num_pairs, n, 1.0 / numel, beta, c0, c1, 1.0 / num_items if reduction == "mean" else 1.0,
        LOSS=LOSS_IDS[loss], HAS_REF=ref2d is not None, SPLITS=splits, SPLITS_P2=splits_p2,
        BLOCK_B=max(1, min(triton.next_power_of_2(num_pairs), 4096 // splits_p2)),
    )  # fmt: skip
    out = losses if reduction == "none" else total[0].clone()  # not a view of the (2,) buffer
    return out, u, err, dl_de


def pair_loss_backward(grad_out, model_pred, target, dl_de, loss, reduction, num_splits=None):
    """∂L/∂model_pred from the forward's ``dl_de``: re-reads ``model_pred`` and ``target`` once."""
    n = model_pred.shape[0]
    num_pairs = (n + 1) // 2
    unpaired = loss in UNPAIRED_LOSSES
    model2d, target2d = _rows(model_pred, n), _rows(target, target.shape[0])
    numel = model2d.shape[1]
    cfg = launch_config(num_pairs, numel, model2d.device, num_splits, model2d.element_size())
    coef = 2.0 / numel / ((n if unpaired else num_pairs) if reduction == "mean" else 1)
    grad = pair_err_backward(model2d, target2d, dl_de, grad_out, coef, num_pairs, cfg, unpaired)
    return grad.view(model_pred.shape)


class PairErrors(torch.autograd.Function):
    """``(model_pred, ref_pred | None, target) → (e_θ (N,), e_ref (N,))`` through the same kernels:
    the per-sample errors alone, for losses that combine them across pairs (Diffusion-RPO). Only
    e_θ is differentiable; its backward is the pair backward kernel with ``dl_de = ∂L/∂e_θ``."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, num_splits):
        n = model_pred.shape[0]
        num_pairs = (n + 1) // 2
        model2d = _rows(model_pred, n)
        target2d = _rows(target, target.shape[0])
        ref2d = _rows(ref_pred, n) if ref_pred is not None else None
        numel = model2d.shape[1]
        cfg = launch_config(num_pairs, numel, model2d.device, num_splits, model2d.element_size())
        partial = pair_err_partials(model2d, ref2d, target2d, num_pairs, cfg)
        err = partial.sum(dim=2) * (1.0 / numel)  # (2, N): the fixed-order split sum, O(N·SPLITS)
        ctx.save_for_backward(model2d, target2d)
        ctx.cfg = cfg
        ctx.shape = model_pred.shape
        ctx.has_ref = ref2d is not None
        ref = err[1] if ref2d is not None else torch.zeros_like(err[1])
        ctx.mark_non_differentiable(ref)
        return err[0], ref

    @staticmethod
    def backward(ctx, grad_err, _grad_ref):
        if not ctx.needs_input_grad[0] or grad_err is None:
            return None, None, None, None
        model2d, target2d = ctx.saved_tensors
        n, numel = model2d.shape
        one = torch.ones(1, dtype=torch.float32, device=model2d.device)
        grad = pair_err_backward(model2d, target2d, grad_err.to(torch.float32).contiguous(), one, 2.0 / numel,
                                 (n + 1) // 2, ctx.cfg, unpaired=True)  # fmt: skip
        return grad.view(ctx.shape), None, None, None


@torch.compiler.disable
def fused_pair_errors(model_pred, ref_pred, target, *, num_splits=None):
    """Per-sample errors ``(e_θ, e_ref)`` through the fused kernels (e_ref = 0 without ``ref_pred``)."""
    return PairErrors.apply(model_pred, ref_pred, target, num_splits)
