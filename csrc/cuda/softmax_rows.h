// The row-softmax losses' CUDA launcher (kl_div_with_logits_fwd, divergence_with_logits_fwd: call says which),
// defined in kl_div_with_logits.cu over the per-pair units softmax_rows_*.cu.
#pragma once
#include <ATen/ATen.h>

#include "../common.h"

namespace kl_ext {
namespace cuda {

void softmax_rows_fwd(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                      const c10::optional<at::Tensor>& mask, double temperature,
                      const c10::optional<at::Tensor>& grad_scale);

}  // namespace cuda
}  // namespace kl_ext
