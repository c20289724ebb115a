// sparse_kl_div_with_logits: the CUDA registration. The kernel is in sparse_kl_div_with_logits.cuh (shared with the
// CPU emulation in tests/cuda_emu), compiled in kl_div_with_logits.cu with the other row kernels (softmax_rows.h).
#include <torch/library.h>

#include "softmax_rows.h"

namespace kl_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_div_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
    const c10::optional<at::Tensor>& mask, c10::string_view target_type, c10::string_view tail, double temperature,
    bool grad_input, bool grad_target, const c10::optional<at::Tensor>& grad_scale) {
  SparseCall call = prepare_sparse(input, indices, values, mask, target_type, tail, temperature, grad_input,
                                   grad_target, grad_scale);
  cuda::sparse_rows_fwd(call, input, indices, values, mask, temperature, grad_scale);
  return {call.loss, call.gx, call.gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) { m.impl("sparse_kl_div_with_logits_fwd", &sparse_kl_div_with_logits_fwd_cuda); }

}  // namespace kl_ext
