// kl_ext._C.log_poly: cpu_math.h's log over a tensor, for tests/test_cpu_math.py to hold it to its accuracy.
#include "cpu_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace kl_ext {

at::Tensor log_poly(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "kl_ext._C.log_poly: a CPU tensor, not ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "log_poly", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t n = xc.numel();
    for (int64_t i = 0; i < n; i += V::size()) {
      const int64_t k = std::min<int64_t>(V::size(), n - i);
      cpu::log_poly(V::loadu(src + i, k)).store(dst + i, k);
    }
  });
  return out;
}

}  // namespace kl_ext
