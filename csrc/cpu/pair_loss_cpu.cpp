// CPU implementation of the fused pair-loss ops (schemas: csrc/ops.cpp, math: csrc/pair_loss.h).
//
// Forward, one pass: each task (pair i, chunk c of S) reads chunk c of the winner and loser rows
// of model_pred, ref_pred and target (the target row once when a pair shares it) and writes four
// partial sums of squares. Tasks are spread over threads by at::parallel_for (OpenMP in PyTorch
// builds, so torch.set_num_threads applies) across samples *and* within a sample. The chunking
// depends on D only and each partial is summed in a fixed lane order, then the partials in chunk
// order: the result is bit-identical for any thread count.
// Backward: re-reads model_pred and target (no (2B, D) buffer kept from the forward).
// Accumulation: fp32 for fp16/bf16/fp32 input (fp64 for fp64), chunk partials combined in fp64.
#include "../pair_loss.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fastpref {
namespace {

constexpr int64_t kChunk = 8192;        // elements of S per task (fixed: thread-count independent)
constexpr int64_t kMinPerThread = 65536;  // elements; below this a thread is not worth waking
constexpr int kLanes = 16;              // independent fp32 accumulators: vectorisable, fixed order

template <typename acc_t>
inline acc_t lanes_sum(const acc_t (&lanes)[kLanes]) {
  acc_t s = acc_t(0);
  for (int k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

// Σ(model − target)² for winner and loser (and the same for ref when HAS_REF) over [lo, hi).
template <typename scalar_t, bool HAS_REF, bool SHARED>
void chunk_sums(const scalar_t* mw, const scalar_t* ml, const scalar_t* rw, const scalar_t* rl,
                const scalar_t* tw, const scalar_t* tl, int64_t len, at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t a_mw[kLanes] = {}, a_ml[kLanes] = {}, a_rw[kLanes] = {}, a_rl[kLanes] = {};
  auto step = [&](int64_t j, int k) {
    const acc_t t0 = static_cast<acc_t>(tw[j]);
    const acc_t t1 = SHARED ? t0 : static_cast<acc_t>(tl[j]);
    const acc_t dw = static_cast<acc_t>(mw[j]) - t0, dl = static_cast<acc_t>(ml[j]) - t1;
    a_mw[k] += dw * dw;
    a_ml[k] += dl * dl;
    if (HAS_REF) {
      const acc_t ew = static_cast<acc_t>(rw[j]) - t0, el = static_cast<acc_t>(rl[j]) - t1;
      a_rw[k] += ew * ew;
      a_rl[k] += el * el;
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) step(j + k, k);
  }
  for (int k = 0; j + k < len; ++k) step(j + k, k);
  out[0] = lanes_sum<acc_t>(a_mw);
  out[1] = lanes_sum<acc_t>(a_ml);
  out[2] = HAS_REF ? lanes_sum<acc_t>(a_rw) : acc_t(0);
  out[3] = HAS_REF ? lanes_sum<acc_t>(a_rl) : acc_t(0);
}

template <typename scalar_t>
void partial_sums(const at::Tensor& m2, const at::Tensor* r2, const at::Tensor& t2, int64_t B, int64_t D,
                  int64_t nchunks, at::opmath_type<scalar_t>* partial /* (2B·nchunks, 4)-ish, see below */) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* m = m2.data_ptr<scalar_t>();
  const scalar_t* r = r2 ? r2->data_ptr<scalar_t>() : nullptr;
  const scalar_t* t = t2.data_ptr<scalar_t>();
  const int64_t sm = m2.stride(0), sr = r2 ? r2->stride(0) : 0, st = t2.stride(0);
  const bool shared = t2.size(0) != 2 * B;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::min(D, kChunk));
  at::parallel_for(0, B * nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / nchunks, c = task % nchunks;
      const int64_t lo = c * kChunk, len = std::min(D, lo + kChunk) - lo;
      const int64_t ti_l = shared ? i : i + B;
      const scalar_t* mw = m + i * sm + lo;
      const scalar_t* ml = m + (i + B) * sm + lo;
      const scalar_t* rw = r ? r + i * sr + lo : nullptr;
      const scalar_t* rl = r ? r + (i + B) * sr + lo : nullptr;
      const scalar_t* tw = t + i * st + lo;
      const scalar_t* tl = t + ti_l * st + lo;
      acc_t* out = partial + task * 4;  // [Σ mw, Σ ml, Σ rw, Σ rl] of pair i, chunk c
      if (r) {
        shared ? chunk_sums<scalar_t, true, true>(mw, ml, rw, rl, tw, tl, len, out)
               : chunk_sums<scalar_t, true, false>(mw, ml, rw, rl, tw, tl, len, out);
      } else {
        shared ? chunk_sums<scalar_t, false, true>(mw, ml, rw, rl, tw, tl, len, out)
               : chunk_sums<scalar_t, false, false>(mw, ml, rw, rl, tw, tl, len, out);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fwd_cpu(
    const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred, const at::Tensor& target,
    const c10::optional<at::Tensor>& ref_err, int64_t loss, double beta, double c0, double c1, int64_t reduction) {
  check_fwd_inputs(model_pred, ref_pred, target, ref_err, loss, reduction);
  const int64_t n = model_pred.size(0), B = n / 2;
  const at::Tensor m2 = as_rows(model_pred, n);
  const at::Tensor t2 = as_rows(target, target.size(0));
  const at::Tensor r2 = ref_pred.has_value() ? as_rows(*ref_pred, n) : at::Tensor();
  const int64_t D = m2.size(1);
  const int64_t nchunks = (D + kChunk - 1) / kChunk;

  const auto acc_type = model_pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = model_pred.options().dtype(acc_type);
  at::Tensor errors = at::empty({2, n}, opts);
  at::Tensor margin = at::empty({B}, opts);
  at::Tensor losses = at::empty({B}, opts);
  at::Tensor dl_de = at::empty({n}, opts);
  at::Tensor total = at::empty({}, opts);
  at::Tensor ref_err_acc = ref_err.has_value() ? ref_err->to(acc_type).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(static_cast<size_t>(B * nchunks * 4));
    partial_sums<scalar_t>(m2, r2.defined() ? &r2 : nullptr, t2, B, D, nchunks, partial.data());

    acc_t* e = errors.data_ptr<acc_t>();  // [e_θ (2B) | e_ref (2B)]
    acc_t* u = margin.data_ptr<acc_t>();
    acc_t* l = losses.data_ptr<acc_t>();
    acc_t* g = dl_de.data_ptr<acc_t>();
    const acc_t* re = ref_err_acc.defined() ? ref_err_acc.data_ptr<acc_t>() : nullptr;
    double sum = 0.0;
    for (int64_t i = 0; i < B; ++i) {  // O(B·nchunks) work: serial, in a fixed order
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t c = 0; c < nchunks; ++c) {
        for (int q = 0; q < 4; ++q) s[q] += static_cast<double>(partial[(i * nchunks + c) * 4 + q]);
      }
      const acc_t mw = static_cast<acc_t>(s[0] / D), ml = static_cast<acc_t>(s[1] / D);
      const acc_t rw = re ? re[i] : static_cast<acc_t>(s[2] / D);
      const acc_t rl = re ? re[i + B] : static_cast<acc_t>(s[3] / D);
      const PairLoss<acc_t> p = pair_loss_and_grad<acc_t>(mw, ml, rw, rl, static_cast<acc_t>(beta),
                                                          static_cast<acc_t>(c0), static_cast<acc_t>(c1), loss);
      e[i] = mw;
      e[i + B] = ml;
      e[n + i] = rw;
      e[n + i + B] = rl;
      u[i] = p.u;
      l[i] = p.loss;
      g[i] = p.dl_dmw;
      g[i + B] = p.dl_dml;
      sum += static_cast<double>(p.loss);
    }
    total.fill_(reduction == kMean ? sum / B : sum);
  });
  return {reduction == kNone ? losses : total, margin, errors, dl_de};
}

at::Tensor pair_loss_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& model_pred, const at::Tensor& target,
                             const at::Tensor& dl_de, int64_t reduction) {
  const int64_t n = model_pred.size(0), B = n / 2;
  check_bwd_inputs(grad_out, model_pred, dl_de, reduction);
  const at::Tensor m2 = as_rows(model_pred, n);
  const at::Tensor t2 = as_rows(target, target.size(0));
  const int64_t D = m2.size(1);
  const bool shared = t2.size(0) != n;
  at::Tensor grad = at::empty(model_pred.sizes(), model_pred.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t nchunks = (D + kChunk - 1) / kChunk;
  // coef = 2/D (· 1/B for "mean"), as in the Triton backward
  const double coef = 2.0 / static_cast<double>(D) / (reduction == kMean ? static_cast<double>(B) : 1.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor go = grad_out.to(acc_type).contiguous().reshape({-1});
    const at::Tensor dl = dl_de.to(acc_type).contiguous();
    const acc_t* gop = go.data_ptr<acc_t>();
    const acc_t* dlp = dl.data_ptr<acc_t>();
    const scalar_t* m = m2.data_ptr<scalar_t>();
    const scalar_t* t = t2.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t sm = m2.stride(0), st = t2.stride(0);
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::min(D, kChunk));
    at::parallel_for(0, n * nchunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / nchunks, c = task % nchunks;
        const int64_t pair = k % B, trow = shared ? pair : k;
        const acc_t g = gop[reduction == kNone ? pair : 0] * static_cast<acc_t>(coef);
        const acc_t ck = g * dlp[k];
        const int64_t lo = c * kChunk, hi = std::min(D, lo + kChunk);
        const scalar_t* mk = m + k * sm;
        const scalar_t* tk = t + trow * st;
        scalar_t* ok = out + k * D;
        for (int64_t j = lo; j < hi; ++j) {
          ok[j] = static_cast<scalar_t>(ck * (static_cast<acc_t>(mk[j]) - static_cast<acc_t>(tk[j])));
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("pair_loss_fwd", &fastpref::pair_loss_fwd_cpu);
  m.impl("pair_loss_bwd", &fastpref::pair_loss_bwd_cpu);
}
