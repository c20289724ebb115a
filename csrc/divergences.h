// The divergences of divergence_with_logits_fwd, each written once for both C++ backends: its per-element loss
// term f and partial derivatives gq = dL/dq, gp = dL/dp, from an element's student and teacher log-probs ls, lt
// and probs q, p. The row drivers (CPU: csrc/divergences.cpp over ATen Vectorized; CUDA: DivergenceLoss in
// csrc/cuda/kl_div_with_logits.cuh over scalars) make the loss and gradients from them. Adding a divergence: its
// terms here, a case in with_divergence, its name in parse_divergence; the rest: ARCHITECTURE.md, "Adding a loss".
//
// M is the backend's math over its value type M::T (a vector of, or one, accumulation-type value M::S):
//   c(x) a constant; select_pos(d, a, b): a where d > 0, else b; lazy_select_pos(d, fa, fb): the same of
//   fa() and fb() (scalars evaluate only the one taken: fewer live registers in the CUDA kernels); abs, exp,
//   log, max, log1p, expm1 (of x <= 0).
// Terms of zero weight are 0, never 0 * inf (0 log 0 = 0).
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <string>

namespace kl_ext {

enum class Divergence { JSD, TVD, SkewForward, SkewReverse };

inline Divergence parse_divergence(const std::string& s) {
  if (s == "jsd") return Divergence::JSD;
  if (s == "tvd") return Divergence::TVD;
  if (s == "skew_forward") return Divergence::SkewForward;
  if (s == "skew_reverse") return Divergence::SkewReverse;
  TORCH_CHECK(false, "kl_ext: divergence must be 'jsd', 'tvd', 'skew_forward' or 'skew_reverse', got '", s, "'");
}

// Whether the divergence takes param (JSD beta, skew alpha), which must then be in (0, 1).
inline bool divergence_has_param(Divergence d) { return d != Divergence::TVD; }

template <typename T>
struct DivTerms {
  T f, gq, gp;
};

template <typename M>
C10_HOST_DEVICE inline typename M::T pos(const typename M::T& c, const typename M::T& a) {
  return M::select_pos(c, a, M::c(0));
}

// log(w e^lt + (1 - w) e^ls) (w1 = 1 - w) from the larger of ls, lt: max + log1p(c expm1(-|lt - ls|)), c the
// smaller side's weight. Exactly ls when lt == ls (identical rows: loss 0), never the log of a sum that
// underflows; NaN only where both are -inf, where every use is masked.
template <typename M>
C10_HOST_DEVICE inline typename M::T log_mixture(const typename M::T& ls, const typename M::T& lt,
                                                 const typename M::T& w, const typename M::T& w1) {
  const typename M::T d = lt - ls;
  return M::max(ls, lt) + M::log1p(M::select_pos(d, w1, w) * M::expm1(M::c(0) - M::abs(d)));
}

// The same, accurate for any weight in [0, 1]: where the larger side's weight w' is small, 1 + c expm1(-|d|) =
// w' + c e^-|d| cancels (w' ~ 1e-6: ~6e-8 / w' relative error in fp32), so there it is summed directly. Costs
// an exp and a log more per element; the skew KL takes it (its alpha is often small), the JSD's beta is not.
template <typename M>
C10_HOST_DEVICE inline typename M::T log_mixture_exact(const typename M::T& ls, const typename M::T& lt,
                                                       const typename M::T& w, const typename M::T& w1) {
  const typename M::T d = lt - ls, ad = M::abs(d), c = M::select_pos(d, w1, w), big = M::select_pos(d, w, w1);
  const typename M::T u = c * M::expm1(M::c(0) - ad);
  return M::max(ls, lt) + M::lazy_select_pos(u + M::c(0.5), [&] { return M::log1p(u); },
                                             [&] { return M::log(big + c * M::exp(M::c(0) - ad)); });
}

// The generalized JSD(beta): m = beta p + (1 - beta) q, beta KL(p || m) + (1 - beta) KL(q || m).
template <typename M>
struct JSDTerms {
  typename M::T b, b1;
  C10_HOST_DEVICE explicit JSDTerms(typename M::S beta) : b(M::c(beta)), b1(M::c(typename M::S(1) - beta)) {}
  C10_HOST_DEVICE DivTerms<typename M::T> operator()(const typename M::T& ls, const typename M::T& lt,
                                                     const typename M::T& q, const typename M::T& p) const {
    const typename M::T lm = log_mixture<M>(ls, lt, b, b1);
    const typename M::T g = b1 * (ls - lm), h = b * (lt - lm);
    return {pos<M>(q, q * g) + pos<M>(p, p * h), g, h};
  }
};

// Total variation distance: 1/2 sum |p - q|; sign(0) = 0 at ties (torch.sign's).
template <typename M>
struct TVDTerms {
  C10_HOST_DEVICE explicit TVDTerms(typename M::S) {}
  C10_HOST_DEVICE DivTerms<typename M::T> operator()(const typename M::T&, const typename M::T&,
                                                     const typename M::T& q, const typename M::T& p) const {
    const typename M::T d = q - p, half = M::c(0.5), zero = M::c(0);
    const typename M::T s = M::select_pos(d, half, zero) - M::select_pos(zero - d, half, zero);
    return {half * M::abs(d), s, zero - s};
  }
};

// Skew KL (DistiLLM): forward KL(p || m), m = alpha p + (1 - alpha) q; reverse KL(q || m), m = alpha q +
// (1 - alpha) p. With l = lt - lm (forward; ls - lm reverse) and r = e^l (p / m; q / m): the term p l (q l), the
// own side's derivative l + 1 - alpha r, the other side's -(1 - alpha) r.
template <typename M, bool Forward>
struct SkewTerms {
  typename M::T a, a1;
  C10_HOST_DEVICE explicit SkewTerms(typename M::S alpha) : a(M::c(alpha)), a1(M::c(typename M::S(1) - alpha)) {}
  C10_HOST_DEVICE DivTerms<typename M::T> operator()(const typename M::T& ls, const typename M::T& lt,
                                                     const typename M::T& q, const typename M::T& p) const {
    const typename M::T lm = Forward ? log_mixture_exact<M>(ls, lt, a, a1) : log_mixture_exact<M>(ls, lt, a1, a);
    const typename M::T l = Forward ? lt - lm : ls - lm, w = Forward ? p : q, r = M::exp(l);
    const typename M::T own = l + M::c(1) - a * r, other = M::c(0) - a1 * r;
    return {pos<M>(w, w * l), Forward ? other : own, Forward ? own : other};
  }
};

// f(terms) with the terms of divergence d at param.
template <typename M, typename F>
C10_HOST_DEVICE inline auto with_divergence(Divergence d, typename M::S param, const F& f) {
  switch (d) {
    case Divergence::JSD: return f(JSDTerms<M>(param));
    case Divergence::TVD: return f(TVDTerms<M>(param));
    case Divergence::SkewForward: return f(SkewTerms<M, true>(param));
    default: return f(SkewTerms<M, false>(param));
  }
}

}  // namespace kl_ext
