// Vector math for the CPU kernels that inlines where ATen's would call Sleef: a call per vector costs its own
// time plus the spill of every live vector register around it (perf, 2026-11-24: Sleef's logf took 47% of the
// Bernoulli KL forward).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

namespace kl_ext {
namespace cpu {

// log(x), fp32 within 1 ulp (checked over every positive float, 2026-11-24; tests/test_cpu_math.py samples
// them); special values as std::log: log 0 = -inf, log inf = inf, log of a negative or NaN = NaN. As musl's
// logf: x = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)) from the bits (subnormals scaled by 2^23 first);
// s = f / (2 + f), log(1 + f) = 2 atanh(s) = f - hfsq + s (hfsq + R), hfsq = f^2 / 2, R = atanh's odd series
// past its first term, to s^9 (the rest < 1e-9): f is exact and the correction small, so the rounding stays
// under an ulp; ln 2 is taken in two parts. double keeps ATen's (Sleef) log.
template <typename T>
inline at::vec::Vectorized<T> log_poly(const at::vec::Vectorized<T>& x0) {
  using VF = at::vec::Vectorized<T>;
  if constexpr (!std::is_same_v<T, float>) {
    return x0.log();
  } else {
    using VI = at::vec::Vectorized<int32_t>;
    const float inf = std::numeric_limits<float>::infinity();
    const VF sub = x0 < VF(std::numeric_limits<float>::min());
    const VF x = VF::blendv(x0, x0 * VF(8388608.f), sub);
    const VI bits = at::vec::cast<int32_t>(x);
    const VI k = (bits - VI(0x3f3504f3)) >> VI(23);  // 0x3f3504f3: the bits of sqrt(1/2)
    const VF f = at::vec::cast<float>(bits - (k << VI(23))) - VF(1.f);
    const VF kf = at::vec::convert_to_fp_of_same_size<float>(k) - (sub & VF(23.f));
    const VF s = f / (VF(2.f) + f), z = s * s, hfsq = VF(0.5f) * f * f;
    VF R(2.f / 9);
    for (float c : {2.f / 7, 2.f / 5, 2.f / 3}) R = at::vec::fmadd(R, z, VF(c));
    R = R * z;
    const VF ln2_hi(0.693138122558593750f), ln2_lo(9.05800061445916e-06f);  // k ln2_hi is exact (17 bits)
    VF r = at::vec::fmadd(kf, ln2_hi, at::vec::fmadd(s, hfsq + R, kf * ln2_lo) - hfsq + f);
    r = VF::blendv(x0, r, x0 < VF(inf));  // inf and NaN: themselves
    r = VF::blendv(r, VF(-inf), x0 == VF(0.f));
    return VF::blendv(r, VF(std::numeric_limits<float>::quiet_NaN()), x0 < VF(0.f));
  }
}

}  // namespace cpu
}  // namespace kl_ext
