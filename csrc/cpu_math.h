// Vector math for the CPU kernels that inlines where ATen's would call Sleef: a call per vector costs its own
// time plus the spill of every live vector register around it (the Bernoulli KL's and the BCE's profiles:
// BENCHMARKS.md).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <limits>

namespace kl_ext {
namespace cpu {

namespace detail {
// x = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), from the bits (subnormals scaled by 2^23 first): k as float.
inline void log_reduce(const at::vec::Vectorized<float>& x0, at::vec::Vectorized<float>& kf,
                       at::vec::Vectorized<float>& f) {
  using VF = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  const VF sub = x0 < VF(std::numeric_limits<float>::min());
  const VI bits = at::vec::cast<int32_t>(VF::blendv(x0, x0 * VF(8388608.f), sub));
  const VI k = (bits - VI(0x3f3504f3)) >> VI(23);  // 0x3f3504f3: the bits of sqrt(1/2)
  f = at::vec::cast<float>(bits - (k << VI(23))) - VF(1.f);
  kf = at::vec::convert_to_fp_of_same_size<float>(k) - (sub & VF(23.f));
}

// k ln 2 + log(1 + f) + c, c a correction below f's ulp. As musl's logf: s = f / (2 + f), log(1 + f) =
// 2 atanh(s) = f - hfsq + s (hfsq + R), hfsq = f^2 / 2, R atanh's odd series past its first term, to s^9 (the
// rest < 1e-9): f is exact and the rest small, so the rounding stays under an ulp; ln 2 in two parts.
inline at::vec::Vectorized<float> log_reduced(const at::vec::Vectorized<float>& kf,
                                              const at::vec::Vectorized<float>& f,
                                              const at::vec::Vectorized<float>& c) {
  using VF = at::vec::Vectorized<float>;
  const VF s = f / (VF(2.f) + f), z = s * s, hfsq = VF(0.5f) * f * f;
  VF R(2.f / 9);
  for (float a : {2.f / 7, 2.f / 5, 2.f / 3}) R = at::vec::fmadd(R, z, VF(a));
  R = R * z;
  const VF ln2_hi(0.693138122558593750f), ln2_lo(9.05800061445916e-06f);  // k ln2_hi is exact (17 bits)
  return at::vec::fmadd(kf, ln2_hi, at::vec::fmadd(s, hfsq + R, at::vec::fmadd(kf, ln2_lo, c)) - hfsq + f);
}

// std::log's special values, r elsewhere: log 0 = -inf, log inf = inf, NaN for NaN and negative x.
inline at::vec::Vectorized<float> log_specials(const at::vec::Vectorized<float>& x,
                                               const at::vec::Vectorized<float>& r) {
  using VF = at::vec::Vectorized<float>;
  const float inf = std::numeric_limits<float>::infinity();
  const VF out = VF::blendv(VF::blendv(x, r, x < VF(inf)), VF(-inf), x == VF(0.f));
  return VF::blendv(out, VF(std::numeric_limits<float>::quiet_NaN()), x < VF(0.f));
}
}  // namespace detail

// Each function below is fp32; double (tests, gradcheck) keeps ATen's own, Sleef's, through these templates.
template <typename T>
inline at::vec::Vectorized<T> log_poly(const at::vec::Vectorized<T>& x) { return x.log(); }
template <typename T>
inline at::vec::Vectorized<T> expm1_nonpos(const at::vec::Vectorized<T>& x) { return x.expm1(); }
template <typename T>
inline at::vec::Vectorized<T> log1p_poly(const at::vec::Vectorized<T>& y) { return y.log1p(); }
template <typename T>
inline at::vec::Vectorized<T> log1p_unit(const at::vec::Vectorized<T>& e) { return e.log1p(); }

// log(x) within 1 ulp (checked over every positive float), special values as std::log.
inline at::vec::Vectorized<float> log_poly(const at::vec::Vectorized<float>& x) {
  at::vec::Vectorized<float> kf, f;
  detail::log_reduce(x, kf, f);
  return detail::log_specials(x, detail::log_reduced(kf, f, at::vec::Vectorized<float>(0.f)));
}

// expm1(x) for x <= 0 (NaN stays NaN), within 1.4 ulp (every non-positive float): Taylor to x^11
// on [-1, 0] (the rest < 4e-9 relative), exp - 1 below (|result| > 0.63: exp_u20's error stays about an ulp).
inline at::vec::Vectorized<float> expm1_nonpos(const at::vec::Vectorized<float>& x) {
  using VF = at::vec::Vectorized<float>;
  // 1 / n! from n = 11 down to 2
  constexpr float inv_fact[] = {1.f / 39916800, 1.f / 3628800, 1.f / 362880, 1.f / 40320, 1.f / 5040,
                                1.f / 720,      1.f / 120,     1.f / 24,     1.f / 6,     1.f / 2};
  VF p(inv_fact[0]);
  for (int i = 1; i < 10; ++i) p = at::vec::fmadd(p, x, VF(inv_fact[i]));
  return VF::blendv(at::vec::fmadd(x * x, p, x), x.exp_u20() - VF(1.f), x < VF(-1.f));
}

// log1p(y) within 1 ulp (every float in [-1, 1]), as musl's log1pf: where 1 + y lies in
// [sqrt(1/2), sqrt(2)), f = y exactly; elsewhere u = 1 + y is reduced as for the log and (y - (u - 1)) / u adds
// back what rounding u lost.
inline at::vec::Vectorized<float> log1p_poly(const at::vec::Vectorized<float>& y) {
  using VF = at::vec::Vectorized<float>;
  const VF u = VF(1.f) + y;
  VF kf, f;
  detail::log_reduce(u, kf, f);
  const VF near = (y >= VF(-0.29289321881f)) & (y < VF(0.41421356237f));
  const VF c = VF::blendv((y - (u - VF(1.f))) / u, VF(0.f), near);
  return detail::log_specials(u, detail::log_reduced(VF::blendv(kf, VF(0.f), near), VF::blendv(f, y, near), c));
}

// log1p(e) for e in [0, 1] (softplus's log1p(exp(-|z|))) within 3 ulp (every float there):
// 2 atanh(s), s = e / (2 + e) <= 1/3, by atanh's odd series to s^13 (the rest < 1.6e-8 relative). About 10
// vector ops, cheaper than log1p_poly where the range allows (Sleef's log1p dominated the BCE forward).
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) {
  using VF = at::vec::Vectorized<float>;
  const VF s = e / (VF(2.f) + e), w = s * s;
  VF q(1.f / 13);
  for (float c : {1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f}) q = at::vec::fmadd(q, w, VF(c));
  return VF(2.f) * s * q;
}

}  // namespace cpu
}  // namespace kl_ext
