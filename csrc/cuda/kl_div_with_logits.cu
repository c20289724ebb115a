// kl_div_with_logits: the CUDA registration. Kernels and the host entry are in kl_div_with_logits.cuh (shared
// with the CPU emulation in tests/cuda_emu).
#include "launch.cuh"
#include "kl_div_with_logits.cuh"

#include <torch/library.h>

namespace kl_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_with_logits_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view direction, bool grad_input,
    bool grad_target, const c10::optional<at::Tensor>& grad_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int device = input.get_device();
  const cuda::KLDevice dev{cuda::sm_count(device), cuda::has_clusters(device)};
  auto out = cuda::kl_div_with_logits_fwd_impl(input, target, mask, target_type, temperature, direction, grad_input,
                                               grad_target, grad_scale, dev, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) { m.impl("kl_div_with_logits_fwd", &kl_div_with_logits_fwd_cuda); }

}  // namespace kl_ext
