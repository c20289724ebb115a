// kl_ext._C.cpu_math: cpu_math.h's functions over a tensor, for tests/test_cpu_math.py to hold them to their
// accuracy.
#include "cpu_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>

namespace kl_ext {

at::Tensor cpu_math(const at::Tensor& x, const std::string& fn) {
  TORCH_CHECK(x.device().is_cpu(), "kl_ext._C.cpu_math: a CPU tensor, not ", x.device());
  TORCH_CHECK(fn == "log" || fn == "log1p" || fn == "log1p_unit" || fn == "expm1_nonpos",
              "kl_ext._C.cpu_math: fn is log, log1p, log1p_unit or expm1_nonpos, not ", fn);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "cpu_math", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t n = xc.numel();
    for (int64_t i = 0; i < n; i += V::size()) {
      const int64_t k = std::min<int64_t>(V::size(), n - i);
      const V v = V::loadu(src + i, k);
      const V r = fn == "log"          ? cpu::log_poly(v)
                  : fn == "log1p"      ? cpu::log1p_poly(v)
                  : fn == "log1p_unit" ? cpu::log1p_unit(v)
                                       : cpu::expm1_nonpos(v);
      r.store(dst + i, k);
    }
  });
  return out;
}

}  // namespace kl_ext
