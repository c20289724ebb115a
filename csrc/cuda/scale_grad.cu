// scale_grad: CUDA kernel (see csrc/scale_grad.cpp for the contract). The fused loss kernels of the CUDA
// backend are registered beside it by the CUDA issue; until then the "cuda" backend reports itself absent
// (kl_ext.available_backends() checks for the forward ops' CUDA kernels) and this file keeps the nvcc
// build path compiled and linked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace kl_ext {
namespace {

template <typename scalar_t>
__global__ void scale_grad_kernel(const scalar_t* __restrict__ g, const at::opmath_type<scalar_t>* __restrict__ s, scalar_t* __restrict__ o,
                                  int64_t n, int64_t V, int64_t sn, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t si = sn == 1 ? 0 : (sn == rows ? i / V : i);
    o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * static_cast<acc_t>(s[si]));
  }
}

at::Tensor scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "kl_ext: scale_grad expects a 2-D contiguous gradient");
  TORCH_CHECK(scale.scalar_type() == acc_type(grad.scalar_type()) && scale.is_contiguous() &&
                  scale.device() == grad.device(),
              "kl_ext: scale must be a contiguous tensor of the accumulation dtype on the gradient's device");
  const int64_t N = grad.size(0), V = grad.size(1), sn = scale.numel();
  TORCH_CHECK(sn == 1 || sn == N || sn == N * V, "kl_ext: scale must hold 1, rows or rows*V values");
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cuda", [&] {
    scale_grad_kernel<scalar_t><<<blocks, threads, 0, stream>>>(grad.const_data_ptr<scalar_t>(),
                                                                scale.const_data_ptr<at::opmath_type<scalar_t>>(),
                                                                out.mutable_data_ptr<scalar_t>(), n, V, sn, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CUDA, m) { m.impl("scale_grad", &scale_grad_cuda); }

}  // namespace kl_ext
