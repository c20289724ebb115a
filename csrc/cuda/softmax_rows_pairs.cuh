// The row kernels of kl_div_with_logits / the divergences (softmax_rows_typed, kl_div_with_logits.cuh) are compiled
// per dtype pair in translation units of their own, softmax_rows_<pairs>.cu, so a parallel build runs them side by
// side (one unit took most of a 16-job build). Such a unit defines KL_EXT_PAIRS(X) as its pairs and includes this
// header, which instantiates them and only them.
#pragma once
#include "launch.cuh"
#include "kl_div_with_logits.cuh"

#define KL_EXT_ALL_PAIRS(X)                                                                     \
  X(double, double) X(float, float) X(c10::BFloat16, c10::BFloat16) X(c10::Half, c10::Half)   \
  X(float, c10::BFloat16) X(c10::BFloat16, float) X(float, c10::Half) X(c10::Half, float)

#define KL_EXT_SOFTMAX_ROWS(prefix, x_t, t_t)                                                           \
  prefix template void softmax_rows_typed<x_t, t_t>(                                                    \
      const KLCall&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double,         \
      const c10::optional<at::Tensor>&, const KLDevice&, cudaStream_t);
#define KL_EXT_DEFINE_PAIR(x_t, t_t) KL_EXT_SOFTMAX_ROWS(, x_t, t_t)
#define KL_EXT_EXTERN_PAIR(x_t, t_t) KL_EXT_SOFTMAX_ROWS(extern, x_t, t_t)

namespace kl_ext {
namespace cuda {
// Every pair is declared instantiated elsewhere, so that softmax_rows_cuda's dispatch (an inline function, compiled
// in every unit that includes kl_div_with_logits.cuh) instantiates none; a pair unit then defines its own.
KL_EXT_ALL_PAIRS(KL_EXT_EXTERN_PAIR)
#ifdef KL_EXT_PAIRS
KL_EXT_PAIRS(KL_EXT_DEFINE_PAIR)
#endif
}  // namespace cuda
}  // namespace kl_ext
