// The row-softmax losses' CUDA launchers (kl_div_with_logits, jsd_with_logits, sparse_kl_div_with_logits),
// defined in kl_div_with_logits.cu: one translation unit compiles every row kernel (each .cu including ATen
// costs minutes of nvcc in CI). softmax_rows_fwd: beta > 0 the JSD, otherwise the KL.
#pragma once
#include <ATen/ATen.h>

#include "../common.h"

namespace kl_ext {
namespace cuda {

void softmax_rows_fwd(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                      const c10::optional<at::Tensor>& mask, double temperature, double beta,
                      const c10::optional<at::Tensor>& grad_scale);

// sparse_kl_div_with_logits' launcher (its kernels in sparse_kl_div_with_logits.cuh, compiled with the KL's).
void sparse_rows_fwd(const SparseCall& call, const at::Tensor& input, const at::Tensor& indices,
                     const at::Tensor& values, const c10::optional<at::Tensor>& mask, double temperature,
                     const c10::optional<at::Tensor>& grad_scale);

}  // namespace cuda
}  // namespace kl_ext
