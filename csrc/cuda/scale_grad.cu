// scale_grad / scale_grad_: CUDA kernels (contract: csrc/scale_grad.cpp): the backward of every kl_ext loss.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace kl_ext {
namespace {

// o = g * s; o may alias g. In place with a single scale of exactly 1, every thread returns at once: the
// common loss.backward() costs one scalar read, no host sync.
template <typename scalar_t>
__global__ void scale_grad_kernel(const scalar_t* g, const at::opmath_type<scalar_t>* __restrict__ s, scalar_t* o,
                                  int64_t n, int64_t V, int64_t sn, int64_t rows, bool inplace) {
  using acc_t = at::opmath_type<scalar_t>;
  if (inplace && sn == 1 && s[0] == acc_t(1)) return;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t si = sn == 1 ? 0 : (sn == rows ? i / V : i);
    o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * s[si]);
  }
}

void scale_into(const at::Tensor& grad, const at::Tensor& scale, at::Tensor& out) {
  check_scale(grad, scale);
  const int64_t n = grad.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cuda", [&] {
    scale_grad_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), scale.const_data_ptr<at::opmath_type<scalar_t>>(),
        out.mutable_data_ptr<scalar_t>(), n, grad.size(1), scale.numel(), grad.size(0), out.is_same(grad));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty_like(grad);
  scale_into(grad, scale, out);
  return out;
}

void scale_grad_inplace_cuda(at::Tensor& grad, const at::Tensor& scale) { scale_into(grad, scale, grad); }

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) {
  m.impl("scale_grad", &scale_grad_cuda);
  m.impl("scale_grad_", &scale_grad_inplace_cuda);
}

}  // namespace kl_ext
