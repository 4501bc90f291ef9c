// CPU implementation of the fused pair-loss ops (schemas: csrc/ops.cpp, math: csrc/pair_loss.h).
//
// Forward, one pass: each task (pair i, chunk c of S) reads chunk c of the winner and loser rows
// of model_pred, ref_pred and target (the target row once when a pair shares it) and writes four
// partial sums of squares. Tasks are spread over threads by at::parallel_for (OpenMP in PyTorch
// builds, so torch.set_num_threads applies) across samples *and* within a sample. The chunking
// depends on D only and each partial is summed in a fixed lane order, then the partials in chunk
// order: the result is bit-identical for any thread count.
// Backward, one pass: re-reads model_pred and target and writes the gradient (no (2B, D) buffer kept
// from the forward).
// Vectorised with ATen's at::vec: 16 elements per step and stream, widened to fp32 in registers and
// the gradient narrowed back with round-to-nearest-even (as c10's scalar conversion). fp16 goes
// through F16C (at::vec::convert_to_float). bf16 on AVX2 is widened by interleaving each 16-bit value
// with 16 zero bits (two unpack instructions per 16 elements: a bf16 is the top half of its fp32)
// and narrowed by rounding and packing the top halves back in the same interleaved order; at::vec's
// conversion also restores the element order (5 instructions per 16 elements each way, more to
// narrow), which an elementwise gradient and a sum of squares do not need. Measured on the 2-vCPU
// EPYC VM, one thread, SD3×32 bf16: forward 6.0 → 4.5 ms, backward 6.5 → 4.6 ms (the conversions
// had made the bf16 loops compute-bound). fastpref/ops/extension.py compiles this file for AVX2 +
// FMA + F16C when ATen reports that capability on the building machine (else at::vec's portable
// code). Each stream is prefetched kPrefetchBytes ahead. Accumulation: fp32 for fp16/bf16/fp32
// input (fp64 for fp64), chunk partials combined in fp64.
// Page faults: a fresh multi-MiB gradient comes from mmap (glibc maps every block above 32 MiB), and
// on a VM every first touch of a 4 KiB page costs a fault, then the kernel zeroes it (measured on the
// 2-vCPU EPYC VM: 67 ms of CPU time to fill a fresh 64 MiB tensor, 8 ms a reused one). Two remedies:
// (1) the backward keeps the storage of its last gradient of ≥ kReuseMinBytes and writes the next gradient into it
// when nothing else references it any more (the previous step's gradient has been consumed and
// freed, as in a training loop; a caller that still holds it gets a fresh buffer, so no result is
// ever overwritten) — one gradient-sized buffer stays allocated between calls;
// (2) a fresh buffer asks for transparent huge pages (madvise MADV_HUGEPAGE, a no-op where THP is
// off): one fault per 2 MiB instead of per 4 KiB.
// A gradient larger than the L3 cache is written with streaming (non-temporal) stores: its lines are
// not read from DRAM before being overwritten.
#include "../pair_loss.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

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

using FVec = at::vec::Vectorized<float>;
constexpr int kStep = 2 * FVec::size();  // elements per vector step and stream (16 with AVX2)
static_assert(kStep == kLanes, "one fp32 lane per element of a vector step");

// Software prefetch distance of every stream (bytes ahead of the load; one prefetch per 64-byte
// line). Measured on the 2-vCPU EPYC VM, one thread, kernels alone: 5–15 % faster passes above the L3
// cache at 512 bytes, no gain at 2 KiB.
constexpr int64_t kPrefetchBytes = 512;

// p + j, kPrefetchBytes ahead, on the steps `step` (counted from 0 in the loop) that start a 64-byte
// span: every step for fp32 (64 bytes per step), every other one for 16-bit types
template <typename scalar_t>
inline void prefetch_line(const scalar_t* p, int64_t j, int64_t step) {
  if ((step * kStep * static_cast<int64_t>(sizeof(scalar_t))) % 64 == 0) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(reinterpret_cast<const char*>(p + j) + kPrefetchBytes, 0, 3);
#endif
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// bf16 ↔ fp32 for elementwise and summing loops (see the file comment): lo holds elements 0–3 and
// 8–11 of the step, hi 4–7 and 12–15; bf16_pack undoes exactly that order.
inline void bf16_unpack(const at::BFloat16* p, FVec& lo, FVec& hi) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
}
// c10's round_to_nearest_even per fp32 lane, in the low 16 bits: (bits + 0x7fff + lsb) >> 16; NaN → 0x7fc0
inline __m256i bf16_round(const FVec& f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0x7fc0), r, ordered);
}
inline __m256i bf16_pack(const FVec& lo, const FVec& hi) {
  return _mm256_packus_epi32(bf16_round(lo), bf16_round(hi));  // per 128-bit half: lo's 4, then hi's 4
}
constexpr bool kBf16Unpack = true;
#else
constexpr bool kBf16Unpack = false;
#endif

template <typename scalar_t>
constexpr bool kUnpacked = kBf16Unpack && std::is_same_v<scalar_t, at::BFloat16>;

// kStep elements at p widened to fp32: two fp32 vectors (bf16 on AVX2: in the interleaved order)
template <typename scalar_t>
inline void load_step(const scalar_t* p, FVec& lo, FVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo = FVec::loadu(p);
    hi = FVec::loadu(p + FVec::size());
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (kUnpacked<scalar_t>) {
    bf16_unpack(p, lo, hi);
#endif
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store_step(scalar_t* p, const FVec& lo, const FVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo.store(p);
    hi.store(p + FVec::size());
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (kUnpacked<scalar_t>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_pack(lo, hi));
#endif
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

// acc += (x − t)² on both halves of a step
inline void add_squares(const FVec (&x)[2], const FVec (&t)[2], FVec (&acc)[2]) {
  for (int h = 0; h < 2; ++h) {
    const FVec d = x[h] - t[h];
    acc[h] = at::vec::fmadd(d, d, acc[h]);
  }
}

template <typename scalar_t>
constexpr bool kVectorised = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16> ||
                             std::is_same_v<scalar_t, at::Half>;

// Σ(model − target)² for winner and loser (and the same for ref when HAS_REF) over [0, len).
// Each of the kLanes accumulators sums a fixed residue class of the positions mod kLanes (in the
// vector body lane k holds element k of each step, or its interleaved counterpart for bf16 on AVX2;
// in the scalar tail element j goes to lane j mod kLanes): a fixed order for a given len, whatever the
// thread count.
template <typename scalar_t, bool HAS_REF, bool SHARED>
void chunk_sums(const scalar_t* mw, const scalar_t* ml, const scalar_t* rw, const scalar_t* rl,
                const scalar_t* tw, const scalar_t* tl, int64_t len, at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t a_mw[kLanes] = {}, a_ml[kLanes] = {}, a_rw[kLanes] = {}, a_rl[kLanes] = {};
  int64_t j = 0;
  if constexpr (kVectorised<scalar_t>) {
    FVec v_mw[2] = {FVec(0.f), FVec(0.f)}, v_ml[2] = {FVec(0.f), FVec(0.f)};
    FVec v_rw[2] = {FVec(0.f), FVec(0.f)}, v_rl[2] = {FVec(0.f), FVec(0.f)};
    FVec t0[2], t1[2], x[2];
    for (; j + kStep <= len; j += kStep) {
      const int64_t step = j / kStep;
      prefetch_line(tw, j, step);
      prefetch_line(mw, j, step);
      prefetch_line(ml, j, step);
      if constexpr (!SHARED) prefetch_line(tl, j, step);
      if constexpr (HAS_REF) {
        prefetch_line(rw, j, step);
        prefetch_line(rl, j, step);
      }
      load_step(tw + j, t0[0], t0[1]);
      if constexpr (SHARED) {
        t1[0] = t0[0];
        t1[1] = t0[1];
      } else {
        load_step(tl + j, t1[0], t1[1]);
      }
      load_step(mw + j, x[0], x[1]);
      add_squares(x, t0, v_mw);
      load_step(ml + j, x[0], x[1]);
      add_squares(x, t1, v_ml);
      if constexpr (HAS_REF) {
        load_step(rw + j, x[0], x[1]);
        add_squares(x, t0, v_rw);
        load_step(rl + j, x[0], x[1]);
        add_squares(x, t1, v_rl);
      }
    }
    for (int h = 0; h < 2; ++h) {  // lanes h·size … (h+1)·size − 1
      v_mw[h].store(a_mw + h * FVec::size());
      v_ml[h].store(a_ml + h * FVec::size());
      v_rw[h].store(a_rw + h * FVec::size());
      v_rl[h].store(a_rl + h * FVec::size());
    }
  }
  auto step = [&](int64_t i, int k) {
    const acc_t t0 = static_cast<acc_t>(tw[i]);
    const acc_t t1 = SHARED ? t0 : static_cast<acc_t>(tl[i]);
    const acc_t dw = static_cast<acc_t>(mw[i]) - t0, dl = static_cast<acc_t>(ml[i]) - t1;
    a_mw[k] += dw * dw;
    a_ml[k] += dl * dl;
    if (HAS_REF) {
      const acc_t ew = static_cast<acc_t>(rw[i]) - t0, el = static_cast<acc_t>(rl[i]) - t1;
      a_rw[k] += ew * ew;
      a_rl[k] += el * el;
    }
  };
  for (; j + kLanes <= len; j += kLanes) {  // fp64 (or no vector body): the scalar form of the same order
    for (int k = 0; k < kLanes; ++k) step(j + k, k);
  }
  for (int k = 0; j + k < len; ++k) step(j + k, k);
  out[0] = lanes_sum<acc_t>(a_mw);
  out[1] = lanes_sum<acc_t>(a_ml);
  out[2] = HAS_REF ? lanes_sum<acc_t>(a_rw) : acc_t(0);
  out[3] = HAS_REF ? lanes_sum<acc_t>(a_rl) : acc_t(0);
}

#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kStreamingStores = true;
// 32 aligned bytes written around the caches (no read-for-ownership of the destination line)
template <typename scalar_t>
inline void stream_step(scalar_t* p, const FVec& lo, const FVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(p, lo);
    _mm256_stream_ps(p + FVec::size(), hi);
  } else if constexpr (kUnpacked<scalar_t>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_pack(lo, hi));
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<scalar_t>(lo, hi));
  }
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kStreamingStores = false;
template <typename scalar_t>
inline void stream_step(scalar_t* p, const FVec& lo, const FVec& hi) {
  store_step(p, lo, hi);
}
inline void stream_fence() {}
#endif

// grad[j] = c·(model[j] − target[j]) over [lo, hi), narrowed to scalar_t. STREAM: non-temporal
// stores, for a gradient larger than the caches (its lines would be read from DRAM only to be
// overwritten); the caller fences.
template <typename scalar_t, bool STREAM>
void grad_row(const scalar_t* m, const scalar_t* t, scalar_t* out, at::opmath_type<scalar_t> c, int64_t lo,
              int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = lo;
  if constexpr (kVectorised<scalar_t>) {
    const FVec cv(c);
    FVec a[2], b[2];
    if constexpr (STREAM) {  // scalar head up to a 32-byte boundary, then aligned streaming stores
      for (; j < hi && reinterpret_cast<uintptr_t>(out + j) % 32 != 0; ++j) {
        out[j] = static_cast<scalar_t>(c * (static_cast<acc_t>(m[j]) - static_cast<acc_t>(t[j])));
      }
    }
    for (int64_t step = 0; j + kStep <= hi; j += kStep, ++step) {
      prefetch_line(m, j, step);
      prefetch_line(t, j, step);
      load_step(m + j, a[0], a[1]);
      load_step(t + j, b[0], b[1]);
      if constexpr (STREAM) {
        stream_step(out + j, cv * (a[0] - b[0]), cv * (a[1] - b[1]));
      } else {
        store_step(out + j, cv * (a[0] - b[0]), cv * (a[1] - b[1]));
      }
    }
  }
  for (; j < hi; ++j) out[j] = static_cast<scalar_t>(c * (static_cast<acc_t>(m[j]) - static_cast<acc_t>(t[j])));
}

// Gradients from this size on are written with streaming stores (about the L3 of the machines this
// was measured on; a smaller gradient is better left in cache for its consumer).
constexpr size_t kStreamMinBytes = size_t(32) << 20;

// Transparent huge pages for a fresh buffer, before its first touch (see the file comment).
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)nbytes;
#endif
}

// Gradients from this size on (glibc's default mmap threshold) reuse the previous call's storage when
// it is free (see the file comment). The heap alone does not keep them fault-free: measured on the
// 2-vCPU EPYC VM, `dmpo_loss(...).backward()` on SD1.5×16 fp32 latents (a 2 MiB gradient) took 40–180
// minor faults per call through the heap and 0.68–0.92 ms, 0 faults and 0.39–0.42 ms with reuse.
constexpr size_t kReuseMinBytes = size_t(128) << 10;

// A contiguous, uninitialised tensor shaped like `like` for the gradient: the cached storage when
// nothing but the cache references it, else a fresh (huge-page advised) allocation that becomes the
// cached one.
at::Tensor gradient_buffer(const at::Tensor& like) {
  const auto opts = like.options().memory_format(at::MemoryFormat::Contiguous);
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes < kReuseMinBytes) return at::empty(like.sizes(), opts);
  static std::mutex mu;
  static c10::Storage cached;  // one entry: the last large gradient's storage
  std::lock_guard<std::mutex> lock(mu);
  if (!(cached && cached.use_count() == 1 && cached.nbytes() == nbytes)) {
    at::Tensor fresh = at::empty({static_cast<int64_t>(nbytes)}, opts.dtype(at::kByte));
    advise_huge_pages(fresh.data_ptr(), nbytes);
    cached = fresh.storage();
  }
  return at::empty({0}, opts).set_(cached, 0, like.sizes(), c10::contiguous_strides(like.sizes()));
}

// The (n, D) rows of x: data pointer and row stride, with no dispatcher call when x is contiguous
// (the common case: a small batch's forward + backward is otherwise dominated by such calls); else
// through as_rows (a strided view where the rows allow it, one copy otherwise), kept alive in `hold`.
struct Rows {
  at::Tensor hold;
  const void* data;
  int64_t stride, D;
};

Rows rows_of(const at::Tensor& x, int64_t n) {
  if (x.is_contiguous()) {
    const int64_t D = x.numel() / n;
    return {at::Tensor(), x.const_data_ptr(), D, D};
  }
  at::Tensor r = as_rows(x, n);
  const void* data = r.const_data_ptr();
  const int64_t stride = r.stride(0), D = r.size(1);
  return {std::move(r), data, stride, D};
}

// A 1-d fp32/fp64 input (grad_out, dl_de, ref_err) as a contiguous acc_t array: itself when it is
// one already, else a converted copy kept in `hold`.
template <typename acc_t>
const acc_t* acc_data(const at::Tensor& x, at::Tensor& hold) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  if (x.scalar_type() == acc_type && x.is_contiguous()) return x.const_data_ptr<acc_t>();
  hold = x.to(acc_type).contiguous();
  return hold.const_data_ptr<acc_t>();
}

template <typename scalar_t>
void partial_sums(const Rows& m2, const Rows* r2, const Rows& t2, int64_t B, bool shared, int64_t nchunks,
                  at::opmath_type<scalar_t>* partial /* (B·nchunks, 4), see below */) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* m = static_cast<const scalar_t*>(m2.data);
  const scalar_t* r = r2 ? static_cast<const scalar_t*>(r2->data) : nullptr;
  const scalar_t* t = static_cast<const scalar_t*>(t2.data);
  const int64_t sm = m2.stride, sr = r2 ? r2->stride : 0, st = t2.stride, D = m2.D;
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
  const Rows m2 = rows_of(model_pred, n);
  const Rows t2 = rows_of(target, target.size(0));
  const Rows r2 = ref_pred.has_value() ? rows_of(*ref_pred, n) : Rows{};
  const int64_t D = m2.D;
  const int64_t nchunks = (D + kChunk - 1) / kChunk;
  const bool shared = target.size(0) != n;

  const auto acc_type = model_pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = model_pred.options().dtype(acc_type);
  at::Tensor errors = at::empty({2, n}, opts);
  at::Tensor margin = at::empty({B}, opts);
  at::Tensor losses = reduction == kNone ? at::empty({B}, opts) : at::Tensor();
  at::Tensor dl_de = at::empty({n}, opts);
  at::Tensor total = reduction == kNone ? at::Tensor() : at::empty({}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(static_cast<size_t>(B * nchunks * 4));
    partial_sums<scalar_t>(m2, ref_pred.has_value() ? &r2 : nullptr, t2, B, shared, nchunks, partial.data());

    at::Tensor ref_err_hold;
    const acc_t* re = ref_err.has_value() ? acc_data<acc_t>(*ref_err, ref_err_hold) : nullptr;
    acc_t* e = errors.data_ptr<acc_t>();  // [e_θ (2B) | e_ref (2B)]
    acc_t* u = margin.data_ptr<acc_t>();
    acc_t* l = losses.defined() ? losses.data_ptr<acc_t>() : nullptr;
    acc_t* g = dl_de.data_ptr<acc_t>();
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
      if (l) l[i] = p.loss;
      g[i] = p.dl_dmw;
      g[i + B] = p.dl_dml;
      sum += static_cast<double>(p.loss);
    }
    if (total.defined()) *total.data_ptr<acc_t>() = static_cast<acc_t>(reduction == kMean ? sum / B : sum);
  });
  return {reduction == kNone ? losses : total, margin, errors, dl_de};
}

at::Tensor pair_loss_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& model_pred, const at::Tensor& target,
                             const at::Tensor& dl_de, int64_t reduction) {
  const int64_t n = model_pred.size(0), B = n / 2;
  check_bwd_inputs(grad_out, model_pred, dl_de, reduction);
  const Rows m2 = rows_of(model_pred, n);
  const Rows t2 = rows_of(target, target.size(0));
  const int64_t D = m2.D;
  const bool shared = target.size(0) != n;
  at::Tensor grad = gradient_buffer(model_pred);
  const int64_t nchunks = (D + kChunk - 1) / kChunk;
  // coef = 2/D (· 1/B for "mean"), as in the Triton backward
  const double coef = 2.0 / static_cast<double>(D) / (reduction == kMean ? static_cast<double>(B) : 1.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_pred.scalar_type(), "pair_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor go_hold, dl_hold;
    const acc_t* gop = acc_data<acc_t>(grad_out, go_hold);  // () or (B,): contiguous, so flat
    const acc_t* dlp = acc_data<acc_t>(dl_de, dl_hold);
    const scalar_t* m = static_cast<const scalar_t*>(m2.data);
    const scalar_t* t = static_cast<const scalar_t*>(t2.data);
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t sm = m2.stride, st = t2.stride;
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::min(D, kChunk));
    const bool stream = kStreamingStores && kVectorised<scalar_t> && grad.nbytes() >= kStreamMinBytes;
    at::parallel_for(0, n * nchunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / nchunks, c = task % nchunks;
        const int64_t pair = k % B, trow = shared ? pair : k;
        const acc_t g = gop[reduction == kNone ? pair : 0] * static_cast<acc_t>(coef);
        const acc_t ck = g * dlp[k];
        const int64_t lo = c * kChunk, hi = std::min(D, lo + kChunk);
        stream ? grad_row<scalar_t, true>(m + k * sm, t + trow * st, out + k * D, ck, lo, hi)
               : grad_row<scalar_t, false>(m + k * sm, t + trow * st, out + k * D, ck, lo, hi);
      }
      if (stream) stream_fence();  // this thread's streaming stores are visible before the op returns
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
