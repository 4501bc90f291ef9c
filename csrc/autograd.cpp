// Autograd of fastpref::pair_loss_fwd, in C++ (schemas: ops.cpp).
//
// The Autograd kernel wraps the device kernels in a torch::autograd::Function: its forward calls
// pair_loss_fwd again below the autograd keys (so the CPU or CUDA kernel runs, or the fake
// implementation under torch.compile's tracing), its backward calls pair_loss_bwd through the
// dispatcher — the pattern of torchvision's C++ ops, which AOTAutograd traces like any other op.
// Kept in C++ rather than registered from Python (torch.library.register_autograd) because the
// Python route costs ~0.25 ms per forward + backward on one CPU thread (argument normalisation, a
// Python autograd.Function, a Python backward), more than the kernels themselves for a small batch.
//
// Only the loss output is differentiable; margin, errors and ∂ℓ/∂e_θ are statistics (marked
// non-differentiable). ref_pred, target and ref_err get no gradient (the Python front end refuses
// inputs that require one). No double backward: pair_loss_bwd falls through autograd, so its
// output does not require grad.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastpref {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<FwdOut(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                      const c10::optional<at::Tensor>&, int64_t, double, double, double, int64_t)>&
fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastpref::pair_loss_fwd", "")
                             .typed<FwdOut(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                           const c10::optional<at::Tensor>&, int64_t, double, double, double,
                                           int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, int64_t)>&
bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastpref::pair_loss_bwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

class PairLoss : public torch::autograd::Function<PairLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred,
                               const c10::optional<at::Tensor>& ref_pred, const at::Tensor& target,
                               const c10::optional<at::Tensor>& ref_err, int64_t loss, double beta, double c0,
                               double c1, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, margin, errors, dl_de] =
        fwd_op().call(model_pred, ref_pred, target, ref_err, loss, beta, c0, c1, reduction);
    ctx->save_for_backward({model_pred, target, dl_de});
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({margin, errors, dl_de});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' (absent) gradients
    return {out, margin, errors, dl_de};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {  // undefined: the loss was not used, zero gradient
      grad = bwd_op().call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["reduction"].toInt());
    }
    // one entry per forward argument: model_pred, ref_pred, target, ref_err, loss, beta, c0, c1, reduction
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

FwdOut pair_loss_fwd_autograd(const at::Tensor& model_pred, const c10::optional<at::Tensor>& ref_pred,
                              const at::Tensor& target, const c10::optional<at::Tensor>& ref_err, int64_t loss,
                              double beta, double c0, double c1, int64_t reduction) {
  auto r = PairLoss::apply(model_pred, ref_pred, target, ref_err, loss, beta, c0, c1, reduction);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace fastpref

TORCH_LIBRARY_IMPL(fastpref, Autograd, m) {
  m.impl("pair_loss_fwd", &fastpref::pair_loss_fwd_autograd);
  m.impl("pair_loss_bwd", torch::CppFunction::makeFallthrough());
}
