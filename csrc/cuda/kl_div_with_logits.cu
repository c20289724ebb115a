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

struct CudaRows {
  static void run(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                  const c10::optional<at::Tensor>& mask, double temperature,
                  const c10::optional<at::Tensor>& grad_scale) {
    cuda::softmax_rows_fwd(call, input, target, mask, temperature, grad_scale);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) {
  m.impl("kl_div_with_logits_fwd", &kl_div_with_logits_fwd<CudaRows>);
  m.impl("divergence_with_logits_fwd", &divergence_with_logits_fwd<CudaRows>);
}

}  // namespace kl_ext
