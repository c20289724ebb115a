// jsd_with_logits: the CUDA registration. The kernels are the KL's row kernels with the JSD pass
// (kl_div_with_logits.cuh), compiled once in kl_div_with_logits.cu.
#include <torch/library.h>

#include "softmax_rows.h"

namespace kl_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, double beta, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_jsd(input, target, mask, target_type, temperature, beta, grad_input, grad_target,
                            grad_scale, row_stats);
  cuda::softmax_rows_fwd(call, input, target, mask, temperature, beta, grad_scale);
  return {call.out(), call.gx, call.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) { m.impl("jsd_with_logits_fwd", &jsd_with_logits_fwd_cuda); }

}  // namespace kl_ext
