// Schemas of the fused pair-loss ops (the library "fastpref") and the checks every device's
// implementation shares. The CPU kernels are in cpu/pair_loss_cpu.cpp, the CUDA ones in
// cuda/pair_loss_cuda.cu; autograd in autograd.cpp; the fake (meta) implementations are registered
// from Python (fastpref/ops/library.py), as the PyTorch custom-op tutorial does.
#include "pair_loss.h"

#include <torch/library.h>

namespace fastpref {

void check_fwd_inputs(const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred,
                      const at::Tensor& target, const c10::optional<at::Tensor>& ref_err, int64_t loss,
                      int64_t reduction) {
  TORCH_CHECK(model_pred.dim() >= 1 && model_pred.size(0) >= 2 && model_pred.size(0) % 2 == 0,
              "fastpref::pair_loss_fwd: model_pred must have an even leading dimension 2B >= 2, got ",
              model_pred.sizes());
  const int64_t n = model_pred.size(0);
  TORCH_CHECK(model_pred.numel() > 0, "fastpref::pair_loss_fwd: model_pred has no elements per sample");
  TORCH_CHECK(at::isFloatingType(model_pred.scalar_type()), "fastpref::pair_loss_fwd: model_pred must be a float tensor");
  TORCH_CHECK(target.scalar_type() == model_pred.scalar_type(),
              "fastpref::pair_loss_fwd: target must have model_pred's dtype (the Python front end promotes mixed dtypes)");
  TORCH_CHECK(target.dim() == model_pred.dim() && (target.size(0) == n || target.size(0) == n / 2) &&
                  target.sizes().slice(1) == model_pred.sizes().slice(1),
              "fastpref::pair_loss_fwd: target must have shape (2B, *S) or (B, *S), got ", target.sizes());
  TORCH_CHECK(ref_pred.has_value() != ref_err.has_value(),
              "fastpref::pair_loss_fwd: pass exactly one of ref_pred or ref_err");
  if (ref_pred.has_value()) {
    TORCH_CHECK(ref_pred->sizes() == model_pred.sizes() && ref_pred->scalar_type() == model_pred.scalar_type(),
                "fastpref::pair_loss_fwd: ref_pred must have model_pred's shape and dtype");
    TORCH_CHECK(ref_pred->device() == model_pred.device(), "fastpref::pair_loss_fwd: ref_pred is on another device");
  } else {
    TORCH_CHECK(ref_err->dim() == 1 && ref_err->size(0) == n && at::isFloatingType(ref_err->scalar_type()),
                "fastpref::pair_loss_fwd: ref_err must be a float tensor of shape (2B,)");
    TORCH_CHECK(ref_err->device() == model_pred.device(), "fastpref::pair_loss_fwd: ref_err is on another device");
  }
  TORCH_CHECK(target.device() == model_pred.device(), "fastpref::pair_loss_fwd: target is on another device");
  TORCH_CHECK(loss >= 0 && loss < kNumLosses, "fastpref::pair_loss_fwd: loss id ", loss,
              " is not implemented here (0-6; kto, id 7, runs on Triton or the reference)");
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "fastpref::pair_loss_fwd: unknown reduction id ", reduction);
}

void check_bwd_inputs(const at::Tensor& grad_out, const at::Tensor& model_pred, const at::Tensor& dl_de,
                      int64_t reduction) {
  const int64_t n = model_pred.size(0);
  TORCH_CHECK(dl_de.dim() == 1 && dl_de.size(0) == n, "fastpref::pair_loss_bwd: dl_de must have shape (2B,)");
  TORCH_CHECK(grad_out.numel() == (reduction == kNone ? n / 2 : 1),
              "fastpref::pair_loss_bwd: grad_out must have one element (or B for reduction 'none')");
}

at::Tensor as_rows(const at::Tensor& x, int64_t n) {
  at::Tensor x2 = x.reshape({n, -1});
  return (x2.size(1) == 1 || x2.stride(1) == 1) ? x2 : x2.contiguous();
}

}  // namespace fastpref

TORCH_LIBRARY(fastpref, m) {
  // Returns (loss, margin u (B,), errors (2, 2B) = [e_θ; e_ref], dl_de (2B,) = ∂ℓ/∂e_θ), all in the
  // accumulation dtype (fp64 for fp64 input, else fp32). loss is () or, for reduction 0, (B,).
  m.def(
      "pair_loss_fwd(Tensor model_pred, Tensor? ref_pred, Tensor target, Tensor? ref_err, int loss, "
      "float beta, float c0, float c1, int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // ∂L/∂model_pred = grad_out · coef · dl_de[k] · (model_pred[k] − target[k]), model_pred's dtype.
  m.def("pair_loss_bwd(Tensor grad_out, Tensor model_pred, Tensor target, Tensor dl_de, int reduction) -> Tensor");
}
