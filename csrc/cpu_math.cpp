// kl_ext._C.cpu_math: cpu_math.h's functions over a tensor, for tests/test_cpu_math.py to hold them to their
// accuracy.
#include "cpu_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <string>

namespace kl_ext {

at::Tensor cpu_math(const at::Tensor& x, const std::string& fn) {
  TORCH_CHECK(x.device().is_cpu(), "kl_ext._C.cpu_math: a CPU tensor, not ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "cpu_math", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    auto apply = [&](auto f) {
      const scalar_t* src = xc.const_data_ptr<scalar_t>();
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0, n = xc.numel(); i < n; i += V::size()) {
        const int64_t k = std::min<int64_t>(V::size(), n - i);
        f(V::loadu(src + i, k)).store(dst + i, k);
      }
    };
    if (fn == "log") apply([](const V& v) { return cpu::log_poly(v); });
    else if (fn == "log1p") apply([](const V& v) { return cpu::log1p_poly(v); });
    else if (fn == "log1p_unit") apply([](const V& v) { return cpu::log1p_unit(v); });
    else if (fn == "expm1_nonpos") apply([](const V& v) { return cpu::expm1_nonpos(v); });
    else TORCH_CHECK(false, "kl_ext._C.cpu_math: fn is log, log1p, log1p_unit or expm1_nonpos, not ", fn);
  });
  return out;
}

}  // namespace kl_ext
