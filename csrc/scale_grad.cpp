// scale_grad / scale_grad_: CPU kernels (schemas: kl_ext/_ops.py). The backward of every kl_ext loss: the forward already
// produced the gradient of the loss, backward multiplies it by grad_output, which lives on the device as a
// tensor (one value, one per row, or one per element), so no host sync is ever needed. The in-place form
// touches no memory when the single scale is exactly 1 (loss.backward() on a reduced loss).
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

// out = grad * scale; out may be grad itself.
void scale_into(const at::Tensor& grad, const at::Tensor& scale, at::Tensor& out) {
  check_scale(grad, scale);
  if (grad.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* s = scale.const_data_ptr<acc_t>();
    if (out.is_same(grad) && scale.numel() == 1 && s[0] == acc_t(1)) return;
    scale_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), s, out.mutable_data_ptr<scalar_t>(), grad.size(0),
                         grad.size(1), scale.numel());
  });
}

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty_like(grad);
  scale_into(grad, scale, out);
  return out;
}

void scale_grad_inplace_cpu(at::Tensor& grad, const at::Tensor& scale) { scale_into(grad, scale, grad); }

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) {
  m.impl("scale_grad", &scale_grad_cpu);
  m.impl("scale_grad_", &scale_grad_inplace_cpu);
}

}  // namespace kl_ext
