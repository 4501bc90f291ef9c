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

// Loss ids: fastpref/ops/pair_loss.py LOSS_IDS is the single source of truth.
enum LossId : int64_t { kSigmoid = 0, kHinge = 1, kIpo = 2, kDmpo = 3, kNumLosses = 4 };

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
struct PairLoss {
  T u;      // margin u = −½βd
  T loss;   // ℓ(u)
  T dl_dd;  // ∂ℓ/∂d
};

// ℓ and ∂ℓ/∂d for d = Δθ − Δref. c0, c1: per-loss constants from the host (pair_loss.py
// _loss_constants). Adding a loss of the family = one `case` here + its id in LOSS_IDS.
template <typename T>
FASTPREF_HD PairLoss<T> pair_loss_and_grad(T d, T beta, T c0, T c1, int64_t loss) {
  const T u = T(-0.5) * beta * d;
  const T du_dd = T(-0.5) * beta;
  switch (loss) {
    case kSigmoid:  // ℓ = softplus(−u), ∂ℓ/∂u = −σ(−u)
      return {u, softplus(-u), -sigmoid(-u) * du_dd};
    case kHinge: {  // ℓ = relu(1 − u), ∂ℓ/∂u = −1[u < 1]
      const T m = T(1) - u;
      return {u, m < T(0) ? T(0) : m, (u < T(1) ? T(-1) : T(0)) * du_dd};
    }
    case kIpo: {  // ℓ = (h − c0)², h = −d, c0 = 1/(2β)
      const T r = -d - c0;
      return {u, r * r, T(-2) * r};
    }
    default: {  // kDmpo: c0 = log(1 − α), c1 = log α; ∂ℓ/∂u = σ(u)σ(−u)(u − log((1−α)/α))
      const T sp = sigmoid(u), sn = sigmoid(-u);
      const T loss_value = sp * (-softplus(-u) - c0) + sn * (-softplus(u) - c1);
      return {u, loss_value, sp * sn * (u - (c0 - c1)) * du_dd};
    }
  }
}

// Checks shared by every device's implementation (the Python front end validates first; these
// guard direct calls of torch.ops.fastpref.*).
void check_fwd_inputs(const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred,
                      const at::Tensor& target, const c10::optional<at::Tensor>& ref_err, int64_t loss,
                      int64_t reduction);

// (n, D) rows of x with unit column stride: a view when the sample dims are contiguous (any row
// stride, e.g. a slice of a larger batch), one explicit copy otherwise.
at::Tensor as_rows(const at::Tensor& x, int64_t n);

}  // namespace fastpref
