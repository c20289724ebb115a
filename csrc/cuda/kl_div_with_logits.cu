// kl_div_with_logits_fwd and divergence_with_logits_fwd: the CUDA registrations. Kernels and the host entry are in
// kl_div_with_logits.cuh (shared with the CPU emulation in tests/cuda_emu), compiled per dtype pair in
// softmax_rows_*.cu.
#include "softmax_rows_pairs.cuh"
#include "softmax_rows.h"

#include <torch/library.h>

namespace kl_ext {
namespace cuda {

void softmax_rows_fwd(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                      const c10::optional<at::Tensor>& mask, double temperature,
                      const c10::optional<at::Tensor>& grad_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int device = input.get_device();
  const KLDevice dev{sm_count(device), has_clusters(device)};
  softmax_rows_cuda(call, input, target, mask, temperature, grad_scale, dev, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view direction, bool grad_input,
    bool grad_target, const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_kl(input, target, mask, target_type, temperature, direction, grad_input, grad_target,
                           grad_scale, row_stats);
  cuda::softmax_rows_fwd(call, input, target, mask, temperature, grad_scale);
  return {call.out(), call.gx, call.gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view divergence, double param, bool grad_input,
    bool grad_target, const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_divergence(input, target, mask, target_type, temperature, divergence, param, grad_input,
                                   grad_target, grad_scale, row_stats);
  cuda::softmax_rows_fwd(call, input, target, mask, temperature, grad_scale);
  return {call.out(), call.gx, call.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) {
  m.impl("kl_div_with_logits_fwd", &kl_div_with_logits_fwd_cuda);
  m.impl("divergence_with_logits_fwd", &divergence_with_logits_fwd_cuda);
}

}  // namespace kl_ext
