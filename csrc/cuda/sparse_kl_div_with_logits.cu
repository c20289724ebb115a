// sparse_kl_div_with_logits: the CUDA launcher and registration. The kernel is in sparse_kl_div_with_logits.cuh
// (shared with the CPU emulation in tests/cuda_emu).
#include <torch/library.h>

#include "launch.cuh"
#include "sparse_kl_div_with_logits.cuh"

namespace kl_ext {
namespace {

void sparse_rows_fwd(const SparseCall& call, const at::Tensor& input, const at::Tensor& indices,
                     const at::Tensor& values, const c10::optional<at::Tensor>& mask, double temperature,
                     const c10::optional<at::Tensor>& grad_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cuda::KLDevice dev{cuda::sm_count(input.get_device()), false};
  cuda::sparse_kl_cuda(call, input, indices, values, mask, temperature, grad_scale, dev,
                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_div_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
    const c10::optional<at::Tensor>& mask, c10::string_view target_type, c10::string_view tail, double temperature,
    bool grad_input, bool grad_target, const c10::optional<at::Tensor>& grad_scale) {
  SparseCall call = prepare_sparse(input, indices, values, mask, target_type, tail, temperature, grad_input,
                                   grad_target, grad_scale);
  sparse_rows_fwd(call, input, indices, values, mask, temperature, grad_scale);
  return {call.loss, call.gx, call.gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) { m.impl("sparse_kl_div_with_logits_fwd", &sparse_kl_div_with_logits_fwd_cuda); }

}  // namespace kl_ext
