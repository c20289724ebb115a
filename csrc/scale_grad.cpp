// scale_grad: op schema + CPU kernel. The backward of every kl_ext loss: the forward already produced the
// gradient of the unreduced loss, backward multiplies it by grad_output / denominator, which lives on the
// device as a tensor (one value, one per row, or one per element) so no host sync is ever needed.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace kl_ext {
namespace {

template <typename scalar_t>
void scale_rows(const scalar_t* g, const at::opmath_type<scalar_t>* s, scalar_t* o, int64_t N, int64_t V, int64_t sn) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(same ? 0 : 2 * V);  // 16-bit rows go through acc_t
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * V;
      const acc_t* gr;
      acc_t* orow;
      if constexpr (same) {
        gr = g + off;
        orow = o + off;
      } else {
        at::vec::convert(g + off, buf.data(), V);
        gr = buf.data();
        orow = buf.data() + V;
      }
      if (sn == N * V && sn != N) {
        at::vec::map2([](Vec u, Vec v) { return u * v; }, orow, gr, s + off, V);
      } else {
        const acc_t f = s[sn == 1 ? 0 : r];
        at::vec::map([f](Vec v) { return v * Vec(f); }, orow, gr, V);
      }
      if constexpr (!same) at::vec::convert(orow, o + off, V);
    }
  });
}

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "kl_ext: scale_grad expects a 2-D contiguous gradient");
  TORCH_CHECK(scale.scalar_type() == acc_type(grad.scalar_type()) && scale.is_contiguous() &&
                  scale.device() == grad.device(),
              "kl_ext: scale must be a contiguous tensor of the accumulation dtype on the gradient's device");
  const int64_t N = grad.size(0), V = grad.size(1);
  const int64_t sn = scale.numel();
  TORCH_CHECK(sn == 1 || sn == N || sn == N * V, "kl_ext: scale must hold 1, rows or rows*V values");
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cpu", [&] {
    scale_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), scale.const_data_ptr<at::opmath_type<scalar_t>>(),
                         out.mutable_data_ptr<scalar_t>(), N, V, sn);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kl_ext, m) {
  // grad * scale, scale (accumulation dtype) broadcast as one value, one per row, or one per element.
  m.def("scale_grad(Tensor grad, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) { m.impl("scale_grad", &scale_grad_cpu); }

}  // namespace kl_ext
