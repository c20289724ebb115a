// The CUDA backend's kernels and host entries (csrc/cuda/*.cuh), built for the CPU emulator (cuda_emu.h) and
// registered as torch.ops.kl_ext_cuda_emu.* on CPU tensors, with the real ops' schemas (defined from
// kl_ext/_ops.py by tests/test_cuda_emulated.py before this loads). set_device() stands
// in for the GPU's facts: its SM count (few SMs make blocks loop over rows) and whether it has clusters.
#include "cuda_emu.h"

#include <torch/library.h>

// From the source root on the include path (-I): this checkout, or a copy with a mutation (tests/test_sanitizers.py).
#include "csrc/cuda/bernoulli_kl_div_with_logits.cuh"
#include "csrc/cuda/kl_div_with_logits.cuh"
#include "csrc/cuda/sparse_kl_div_with_logits.cuh"

namespace {

// A grid limit of 4 blocks: held rows loop over rows as past a GPU's (2^31 - 1 blocks).
kl_ext::cuda::KLDevice device{2, true, 4};

struct EmuRows {
  static void run(const kl_ext::KLCall& call, const at::Tensor& input, const at::Tensor& target,
                  const c10::optional<at::Tensor>& mask, double temperature,
                  const c10::optional<at::Tensor>& grad_scale) {
    kl_ext::cuda::softmax_rows_cuda(call, input, target, mask, temperature, grad_scale, device, nullptr);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fwd(const at::Tensor& input, const at::Tensor& indices,
                                                          const at::Tensor& values,
                                                          const c10::optional<at::Tensor>& mask,
                                                          c10::string_view target_type, c10::string_view tail,
                                                          double temperature, bool grad_input, bool grad_target,
                                                          const c10::optional<at::Tensor>& grad_scale) {
  kl_ext::SparseCall call = kl_ext::prepare_sparse(input, indices, values, mask, target_type, tail, temperature,
                                                   grad_input, grad_target, grad_scale);
  kl_ext::cuda::sparse_kl_cuda(call, input, indices, values, mask, temperature, grad_scale, device, nullptr);
  return {call.loss, call.gx, call.gv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bernoulli_fwd(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, c10::string_view target_type, double temperature,
    bool subtract_entropy, bool elementwise, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale) {
  return kl_ext::cuda::bernoulli_kl_div_with_logits_fwd_impl(input, target, weight, pos_weight, target_type,
                                                             temperature, subtract_entropy, elementwise, grad_input,
                                                             grad_target, grad_scale, device.sms, nullptr);
}

void set_device(int64_t sms, bool clusters) { device = {int(sms), clusters, 4}; }

}  // namespace

// The ops' namespace: kl_ext_cuda_emu, or another for a second build in the same process.
#ifndef KL_EXT_EMU_NAMESPACE
#define KL_EXT_EMU_NAMESPACE kl_ext_cuda_emu
#endif

TORCH_LIBRARY_FRAGMENT(KL_EXT_EMU_NAMESPACE, m) { m.def("set_device(int sms, bool clusters) -> ()", &set_device); }

TORCH_LIBRARY_IMPL(KL_EXT_EMU_NAMESPACE, CPU, m) {
  m.impl("kl_div_with_logits_fwd", &kl_ext::kl_div_with_logits_fwd<EmuRows>);
  m.impl("divergence_with_logits_fwd", &kl_ext::divergence_with_logits_fwd<EmuRows>);
  m.impl("sparse_kl_div_with_logits_fwd", &sparse_fwd);
  m.impl("bernoulli_kl_div_with_logits_fwd", &bernoulli_fwd);
}
