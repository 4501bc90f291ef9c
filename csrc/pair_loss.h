// Fused pair-error + preference-loss op: the math shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) implementations. The readable specification is fastpref/reference.py; the Triton
// twin is fastpref/ops/pair_loss.py (its LOSS_IDS are the ids used here).
//
//   e_θ[k]   = mean_S (model_pred[k] − target[k])²        k = 0 … 2B−1 (winners, then losers)
//   e_ref[k] = mean_S (ref_pred[k]   − target[k])²        (or a precomputed ref_err)
//   d_i      = (e_θ[w_i] − e_θ[l_i]) − (e_ref[w_i] − e_ref[l_i]),   u_i = −½·β·d_i
//   ℓ_i      = ℓ(u_i),  ∂L/∂model_pred[k] = g · ∂ℓ/∂e_θ[k] · 2·(model_pred[k] − target[k]) / D
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPREF_HD __host__ __device__ __forceinline__
#else
#define FASTPREF_HD inline
#endif

namespace fastpref {

// Reductions, as the `reduction` int of the op schema (fastpref/ops/cpp.py: REDUCTION_IDS).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Loss ids: fastpref/ops/pair_loss.py LOSS_IDS is the single source of truth. Id 7 (kto, unpaired
// rows with a batch reference point) is Triton/reference only; the front end never sends it here.
enum LossId : int64_t { kSigmoid = 0, kHinge = 1, kIpo = 2, kDmpo = 3, kDro = 4, kMapo = 5, kOrpo = 6, kNumLosses = 7 };

// softplus(x) = max(x, 0) + log1p(exp(−|x|)): finite for |x| = 1e4, and a NaN stays NaN
// (every comparison with NaN is false, so the NaN operand is what is returned).
template <typename T>
FASTPREF_HD T softplus(T x) {
  return (x < T(0) ? T(0) : x) + std::log1p(std::exp(-std::abs(x)));
}

// σ(x) without overflow: exp of a non-positive number only.
template <typename T>
FASTPREF_HD T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
struct FAndGrad {
  T f, df;
};

// MaPO's f(e) = y/(e^y − 1), y = s·e, and df/de: a series near 0 (f → 1, f' → −s/2), y/expm1(y)
// in between, y·e^{−y} where e^y would overflow (pair_loss.py _mapo_f_and_grad).
template <typename T>
FASTPREF_HD FAndGrad<T> mapo_f_and_grad(T e, T s) {
  const T y = s * e, y2 = y * y;
  if (y < T(0.1)) {
    return {T(1) - T(0.5) * y + y2 / T(12) - y2 * y2 / T(720), s * (T(-0.5) + y / T(6) - y2 * y / T(180))};
  }
  const T f = y > T(60) ? y * std::exp(-y) : y / std::expm1(y);
  return {f, s * (f * ((T(1) - f) / y - T(1)))};  // φ'(y) = φ·((1 − φ)/y − 1)
}

// ORPO's log odds log p − log(1 − p) with log p = −½βe, and its derivative −½β/(1 − p); 1 − p
// floored at 1e-30 like the reference (a perfect prediction has infinite odds).
template <typename T>
FASTPREF_HD FAndGrad<T> orpo_log_odds_and_grad(T e, T beta) {
  const T x = T(0.5) * beta * e;
  const T q_raw = -std::expm1(-x);
  const T q = q_raw > T(1e-30) ? q_raw : T(1e-30);
  const T log_q = x > T(0.6931471805599453) ? std::log1p(-std::exp(-x)) : std::log(q);  // Mächler's log1mexp
  return {-x - log_q, T(-0.5) * beta / q};
}

template <typename T>
struct PairLoss {
  T u;       // margin
  T loss;    // ℓ
  T dl_dmw;  // ∂ℓ/∂e_θ[w]
  T dl_dml;  // ∂ℓ/∂e_θ[l]
};

// Margin, ℓ and its gradient w.r.t. the winner's and the loser's e_θ for one pair. c0, c1: per-loss
// constants from the host (fastpref/ops/family.py: kernel_scalars). Adding a loss of
// the family = one `case` here + its id in LOSS_IDS (docs/adding-a-loss.md).
template <typename T>
FASTPREF_HD PairLoss<T> pair_loss_and_grad(T mw, T ml, T rw, T rl, T beta, T c0, T c1, int64_t loss) {
  if (loss == kMapo) {  // u = T·(f(e_w) − f(e_l)), ℓ = e_w + β_M·softplus(−u); c0 = s, c1 = T
    const FAndGrad<T> fw = mapo_f_and_grad(mw, c0), fl = mapo_f_and_grad(ml, c0);
    const T u = c1 * (fw.f - fl.f);
    const T g = beta * sigmoid(-u) * c1;
    return {u, mw + beta * softplus(-u), T(1) - g * fw.df, g * fl.df};
  }
  if (loss == kOrpo) {  // u = lo(e_w) − lo(e_l), ℓ = e_w + λ·softplus(−u); c0 = λ
    const FAndGrad<T> lw = orpo_log_odds_and_grad(mw, beta), ll = orpo_log_odds_and_grad(ml, beta);
    const T u = lw.f - ll.f;
    const T g = c0 * sigmoid(-u);
    return {u, mw + c0 * softplus(-u), T(1) - g * lw.df, g * ll.df};
  }
  // functions of d = Δθ − Δref, u = −½βd
  const T d = (mw - ml) - (rw - rl);
  const T u = T(-0.5) * beta * d;
  const T du_dd = T(-0.5) * beta;
  T value, dl_dd;
  switch (loss) {
    case kSigmoid:  // ℓ = softplus(−u), ∂ℓ/∂u = −σ(−u)
      value = softplus(-u);
      dl_dd = -sigmoid(-u) * du_dd;
      break;
    case kHinge: {  // ℓ = relu(1 − u), ∂ℓ/∂u = −1[u < 1]
      const T m = T(1) - u;
      value = m < T(0) ? T(0) : m;
      dl_dd = (u < T(1) ? T(-1) : T(0)) * du_dd;
      break;
    }
    case kIpo: {  // ℓ = (h − c0)², h = −d, c0 = 1/(2β)
      const T r = -d - c0;
      value = r * r;
      dl_dd = T(-2) * r;
      break;
    }
    case kDmpo: {  // c0 = log(1 − α), c1 = log α; ∂ℓ/∂u = σ(u)σ(−u)(u − log((1−α)/α))
      const T sp = sigmoid(u), sn = sigmoid(-u);
      value = sp * (-softplus(-u) - c0) + sn * (-softplus(u) - c1);
      dl_dd = sp * sn * (u - (c0 - c1)) * du_dd;
      break;
    }
    default: {  // kDro (host passes β = 2, so u = −d): ℓ = relu(d + m) = relu(c0 − u), c0 = m
      const T m = c0 - u;
      value = m < T(0) ? T(0) : m;
      dl_dd = u < c0 ? T(1) : T(0);
      break;
    }
  }
  return {u, value, dl_dd, -dl_dd};
}

// Checks shared by every device's implementation (the Python front end validates first; these
// guard direct calls of torch.ops.fastpref.*).
void check_fwd_inputs(const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred,
                      const at::Tensor& target, const c10::optional<at::Tensor>& ref_err, int64_t loss,
                      int64_t reduction);
void check_bwd_inputs(const at::Tensor& grad_out, const at::Tensor& model_pred, const at::Tensor& dl_de,
                      int64_t reduction);

// (n, D) rows of x with unit column stride: a view when the sample dims are contiguous (any row
// stride, e.g. a slice of a larger batch), one explicit copy otherwise.
at::Tensor as_rows(const at::Tensor& x, int64_t n);

}  // namespace fastpref
