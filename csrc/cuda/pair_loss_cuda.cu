// CUDA implementation of the fused pair-loss ops (schemas: csrc/ops.cpp, math: csrc/pair_loss.h),
// the twin of the Triton family in fastpref/ops/pair_loss.py.
//
// Forward, two launches:
//   1. pair_err_partials_kernel — grid (B, splits), 256 threads. Block (i, s) reads split s of the
//      winner and loser rows of model_pred, ref_pred and target (the target row once when a pair
//      shares it) with 16-byte vector loads, accumulates in fp32 (fp64 for fp64), reduces with warp
//      shuffles then across warps in shared memory, and writes four partial sums. Splitting S keeps
//      the GPU busy when 2B is small; partials (not atomics) keep the result bit-reproducible.
//   2. pair_loss_finalize_kernel — one block: sums the partials in a fixed order, computes errors,
//      u, ℓ, ∂ℓ/∂e_θ and the reduced loss (a fixed-shape block reduction: deterministic).
// Backward: pair_err_bwd_kernel, grid (2B, splits), re-reads model_pred and target.
// Bytes moved with N = 2B·D elements of s bytes: forward 3N·s (2.5N·s shared target, 1.5N·s with
// ref_err), backward 3N·s. Row offsets are int64 (video latents exceed 2^31 elements).
#include "../pair_loss.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace fastpref {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSplits = 64;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sums NV values over the block; the result is valid in thread 0. Fixed tree: deterministic.
template <typename acc_t, int NV>
__device__ __forceinline__ void block_sum(acc_t (&x)[NV]) {
  __shared__ acc_t smem[NV][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < NV; ++q) x[q] = warp_sum(x[q]);
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) smem[q][warp] = x[q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) x[q] = warp_sum(lane < kWarps ? smem[q][lane] : acc_t(0));
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC, bool HAS_REF, bool SHARED>
__global__ void __launch_bounds__(kThreads) pair_err_partials_kernel(
    const scalar_t* __restrict__ model,   // (2B, D) rows, unit column stride, row stride sm
    const scalar_t* __restrict__ ref,     // (2B, D) rows (read only when HAS_REF)
    const scalar_t* __restrict__ target,  // (2B, D) rows, or (B, D) when SHARED
    at::opmath_type<scalar_t>* __restrict__ partial,  // (4, B, splits) out: Σmw², Σml², Σrw², Σrl²
    int64_t B, int64_t D, int64_t chunk, int64_t sm, int64_t sr, int64_t st) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t lo = split * chunk, hi = ::min(D, lo + chunk);
  const scalar_t* mw = model + i * sm;
  const scalar_t* ml = model + (i + B) * sm;
  const scalar_t* rw = HAS_REF ? ref + i * sr : nullptr;
  const scalar_t* rl = HAS_REF ? ref + (i + B) * sr : nullptr;
  const scalar_t* tw = target + i * st;
  const scalar_t* tl = target + (SHARED ? i : i + B) * st;
  acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};

  auto step = [&](acc_t vmw, acc_t vml, acc_t vrw, acc_t vrl, acc_t vtw, acc_t vtl) {
    const acc_t dw = vmw - vtw, dl = vml - vtl;
    acc[0] += dw * dw;
    acc[1] += dl * dl;
    if (HAS_REF) {
      const acc_t ew = vrw - vtw, el = vrl - vtl;
      acc[2] += ew * ew;
      acc[3] += el * el;
    }
  };
  // lo is a multiple of VEC (chunk is): vector loads up to the last whole vector, then a scalar tail
  const int64_t hv = lo + (hi - lo) / VEC * VEC;
  for (int64_t j = lo + static_cast<int64_t>(threadIdx.x) * VEC; j < hv; j += kThreads * VEC) {
    const auto a = load<scalar_t, VEC>(mw + j), b = load<scalar_t, VEC>(ml + j);
    const auto c = load<scalar_t, VEC>(tw + j);
    const auto d = SHARED ? c : load<scalar_t, VEC>(tl + j);
    Vec<scalar_t, VEC> e, f;
    if (HAS_REF) {
      e = load<scalar_t, VEC>(rw + j);
      f = load<scalar_t, VEC>(rl + j);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      step(static_cast<acc_t>(a.v[k]), static_cast<acc_t>(b.v[k]), HAS_REF ? static_cast<acc_t>(e.v[k]) : acc_t(0),
           HAS_REF ? static_cast<acc_t>(f.v[k]) : acc_t(0), static_cast<acc_t>(c.v[k]), static_cast<acc_t>(d.v[k]));
    }
  }
  for (int64_t j = hv + threadIdx.x; j < hi; j += kThreads) {
    step(static_cast<acc_t>(mw[j]), static_cast<acc_t>(ml[j]), HAS_REF ? static_cast<acc_t>(rw[j]) : acc_t(0),
         HAS_REF ? static_cast<acc_t>(rl[j]) : acc_t(0), static_cast<acc_t>(tw[j]), static_cast<acc_t>(tl[j]));
  }
  block_sum<acc_t, 4>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) partial[(q * B + i) * splits + split] = acc[q];
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) pair_loss_finalize_kernel(
    const acc_t* __restrict__ partial,  // (4, B, splits) from pair_err_partials_kernel
    const acc_t* __restrict__ ref_err,  // (2B,) precomputed e_ref, or nullptr
    acc_t* __restrict__ errors,         // (2, 2B) out: e_θ, e_ref
    acc_t* __restrict__ margin,         // (B,) out: u
    acc_t* __restrict__ losses,         // (B,) out: ℓ
    acc_t* __restrict__ dl_de,          // (2B,) out: ∂ℓ/∂e_θ
    acc_t* __restrict__ total,          // () out: the reduced loss
    int64_t B, int64_t splits, int64_t D, acc_t beta, acc_t c0, acc_t c1, int64_t loss, int64_t reduction) {
  const int64_t n = 2 * B;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t sum[1] = {acc_t(0)};
  for (int64_t i = threadIdx.x; i < B; i += kThreads) {
    acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t c = 0; c < splits; ++c) {
#pragma unroll
      for (int q = 0; q < 4; ++q) s[q] += partial[(q * B + i) * splits + c];
    }
    const acc_t mw = s[0] * inv_d, ml = s[1] * inv_d;
    const acc_t rw = ref_err ? ref_err[i] : s[2] * inv_d;
    const acc_t rl = ref_err ? ref_err[i + B] : s[3] * inv_d;
    const PairLoss<acc_t> p = pair_loss_and_grad<acc_t>(mw, ml, rw, rl, beta, c0, c1, loss);
    errors[i] = mw;
    errors[i + B] = ml;
    errors[n + i] = rw;
    errors[n + i + B] = rl;
    margin[i] = p.u;
    losses[i] = p.loss;
    dl_de[i] = p.dl_dmw;
    dl_de[i + B] = p.dl_dml;
    sum[0] += p.loss;
  }
  block_sum<acc_t, 1>(sum);
  if (threadIdx.x == 0) *total = reduction == kMean ? sum[0] / static_cast<acc_t>(B) : sum[0];
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) pair_err_bwd_kernel(
    const scalar_t* __restrict__ model,   // (2B, D) rows, re-read
    const scalar_t* __restrict__ target,  // (2B, D) or shared (B, D) rows
    scalar_t* __restrict__ grad,          // (2B, D) out, contiguous
    const at::opmath_type<scalar_t>* __restrict__ dl_de,     // (2B,)
    const at::opmath_type<scalar_t>* __restrict__ grad_out,  // (1,) or (B,)
    int64_t B, int64_t D, int64_t chunk, int64_t sm, int64_t st, at::opmath_type<scalar_t> coef, bool per_pair,
    bool shared) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = blockIdx.x, split = blockIdx.y;
  const int64_t pair = k % B;
  const acc_t ck = grad_out[per_pair ? pair : 0] * coef * dl_de[k];
  const scalar_t* mk = model + k * sm;
  const scalar_t* tk = target + (shared ? pair : k) * st;
  scalar_t* gk = grad + k * D;
  const int64_t lo = split * chunk, hi = ::min(D, lo + chunk);
  const int64_t hv = lo + (hi - lo) / VEC * VEC;
  for (int64_t j = lo + static_cast<int64_t>(threadIdx.x) * VEC; j < hv; j += kThreads * VEC) {
    const auto a = load<scalar_t, VEC>(mk + j), b = load<scalar_t, VEC>(tk + j);
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      out.v[q] = static_cast<scalar_t>(ck * (static_cast<acc_t>(a.v[q]) - static_cast<acc_t>(b.v[q])));
    }
    *reinterpret_cast<Vec<scalar_t, VEC>*>(gk + j) = out;
  }
  for (int64_t j = hv + threadIdx.x; j < hi; j += kThreads) {
    gk[j] = static_cast<scalar_t>(ck * (static_cast<acc_t>(mk[j]) - static_cast<acc_t>(tk[j])));
  }
}

// 16-byte vectors when every row start is 16-byte aligned (base pointer and row stride).
template <typename scalar_t>
bool can_vectorise(std::initializer_list<const at::Tensor*> rows) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  for (const at::Tensor* t : rows) {
    if (!t->defined()) continue;
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || t->stride(0) % vec != 0) return false;
  }
  return true;
}

// Calls f(std::integral_constant<int, VEC>) with VEC = 16/sizeof(scalar_t) or 1.
template <typename scalar_t, typename F>
void with_vec(bool vectorise, F&& f) {
  if (vectorise) {
    f(std::integral_constant<int, static_cast<int>(16 / sizeof(scalar_t))>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Splits of S per pair: ~4 blocks per SM in all, each split at least two full sweeps of the block.
int64_t num_splits(int64_t rows, int64_t D, int64_t vec) {
  // the runtime API directly: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = (4 * sms + rows - 1) / rows;
  const int64_t most = std::max<int64_t>(1, D / (2 * kThreads * vec));
  return std::max<int64_t>(1, std::min({want, most, kMaxSplits}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fwd_cuda(
    const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred, const at::Tensor& target,
    const c10::optional<at::Tensor>& ref_err, int64_t loss, double beta, double c0, double c1, int64_t reduction) {
  check_fwd_inputs(model_pred, ref_pred, target, ref_err, loss, reduction);
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const int64_t n = model_pred.size(0), B = n / 2;
  const at::Tensor m2 = as_rows(model_pred, n);
  const at::Tensor t2 = as_rows(target, target.size(0));
  const at::Tensor r2 = ref_pred.has_value() ? as_rows(*ref_pred, n) : at::Tensor();
  const bool shared = t2.size(0) != n, has_ref = r2.defined();
  const int64_t D = m2.size(1);

  const auto acc_type = model_pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = model_pred.options().dtype(acc_type);
  at::Tensor errors = at::empty({2, n}, opts);
  at::Tensor margin = at::empty({B}, opts);
  at::Tensor losses = at::empty({B}, opts);
  at::Tensor dl_de = at::empty({n}, opts);
  at::Tensor total = at::empty({}, opts);
  at::Tensor ref_err_acc = ref_err.has_value() ? ref_err->to(acc_type).contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vectorise = can_vectorise<scalar_t>({&m2, &t2, &r2});
    with_vec<scalar_t>(vectorise, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int64_t splits0 = num_splits(B, D, VEC);
      const int64_t chunk = ((D + splits0 - 1) / splits0 + VEC - 1) / VEC * VEC;
      const int64_t splits = (D + chunk - 1) / chunk;  // no empty split
      at::Tensor partial = at::empty({4, B, splits}, opts);
      const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(splits));
      const scalar_t* r = has_ref ? r2.data_ptr<scalar_t>() : nullptr;
      const int64_t sr = has_ref ? r2.stride(0) : 0;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(m2.data_ptr<scalar_t>(), r, t2.data_ptr<scalar_t>(),
                                              partial.data_ptr<acc_t>(), B, D, chunk, m2.stride(0), sr, t2.stride(0));
      };
      if (has_ref) {
        shared ? launch(pair_err_partials_kernel<scalar_t, VEC, true, true>)
               : launch(pair_err_partials_kernel<scalar_t, VEC, true, false>);
      } else {
        shared ? launch(pair_err_partials_kernel<scalar_t, VEC, false, true>)
               : launch(pair_err_partials_kernel<scalar_t, VEC, false, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pair_loss_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), ref_err_acc.defined() ? ref_err_acc.data_ptr<acc_t>() : nullptr,
          errors.data_ptr<acc_t>(), margin.data_ptr<acc_t>(), losses.data_ptr<acc_t>(), dl_de.data_ptr<acc_t>(),
          total.data_ptr<acc_t>(), B, splits, D, static_cast<acc_t>(beta), static_cast<acc_t>(c0),
          static_cast<acc_t>(c1), loss, reduction);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {reduction == kNone ? losses : total, margin, errors, dl_de};
}

at::Tensor pair_loss_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& model_pred, const at::Tensor& target,
                              const at::Tensor& dl_de, int64_t reduction) {
  const int64_t n = model_pred.size(0), B = n / 2;
  check_bwd_inputs(grad_out, model_pred, dl_de, reduction);
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const at::Tensor m2 = as_rows(model_pred, n);
  const at::Tensor t2 = as_rows(target, target.size(0));
  const int64_t D = m2.size(1);
  at::Tensor grad = at::empty(model_pred.sizes(), model_pred.options().memory_format(at::MemoryFormat::Contiguous));
  const double coef = 2.0 / static_cast<double>(D) / (reduction == kMean ? static_cast<double>(B) : 1.0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor go = grad_out.to(acc_type).contiguous();
    const at::Tensor dl = dl_de.to(acc_type).contiguous();
    // grad rows start at k·D: vectorise only when D keeps them aligned too
    const bool vectorise = can_vectorise<scalar_t>({&m2, &t2, &grad}) && D % (16 / sizeof(scalar_t)) == 0;
    with_vec<scalar_t>(vectorise, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int64_t splits0 = num_splits(n, D, VEC);
      const int64_t chunk = ((D + splits0 - 1) / splits0 + VEC - 1) / VEC * VEC;
      const int64_t splits = (D + chunk - 1) / chunk;
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(splits));
      pair_err_bwd_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          m2.data_ptr<scalar_t>(), t2.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), dl.data_ptr<acc_t>(),
          go.data_ptr<acc_t>(), B, D, chunk, m2.stride(0), t2.stride(0), static_cast<acc_t>(coef),
          reduction == kNone, t2.size(0) != n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_IMPL(fastpref, CUDA, m) {
  m.impl("pair_loss_fwd", &fastpref::pair_loss_fwd_cuda);
  m.impl("pair_loss_bwd", &fastpref::pair_loss_bwd_cuda);
}
