// divergence_with_logits_fwd: the CPU kernel of the divergences between two softmax rows that need per-row sums
// beyond the softmax statistics (kl_div_with_logits has an online kernel of its own). One row driver
// (divergence_rows_cpu); a loss is a policy (csrc/divergences.h): its per-element term f and partial derivatives
// gq = dL/dq, gp = dL/dp, from the element's log-probs ls, lt and probs q, p. The driver sums f, q gq and p gp
// and writes the gradients: to the student logits z = input / T, q (gq - sum q gq); to the teacher, p (gp -
// sum p gp) for logits, p gp for log-probs, gp for probs (0 where p = q = 0). Terms of zero weight are 0, never
// 0 * inf. Schema: kl_ext/_ops.py.
//
// Per row (staged as in kl_div_with_logits, csrc/cpu_rows.h): load (+ max), exp (+ sums), a loss pass that also
// sums q gq and p gp and keeps q, p, gq, gp when a gradient is wanted, and one gradient pass.
#include <torch/library.h>

#include "common.h"
#include "cpu_rows.h"

namespace kl_ext {
namespace {

using namespace cpu;

// csrc/divergences.h's math over ATen vectors.
template <typename Acc>
struct VecMath {
  using S = Acc;
  using T = Vec<S>;
  static T c(S x) { return T(x); }
  static T select_pos(const T& d, const T& a, const T& b) { return T::blendv(b, a, d > T(S(0))); }
  template <typename FA, typename FB>
  static T lazy_select_pos(const T& d, const FA& fa, const FB& fb) {
    return select_pos(d, fa(), fb());
  }
  static T abs(const T& x) { return x.abs(); }
  static T exp(const T& x) { return x.exp_u20(); }
  static T log(const T& x) { return log_poly(x); }
  static T max(const T& a, const T& b) { return at::vec::maximum(a, b); }
  static T log1p(const T& x) { return log1p_poly(x); }
  static T expm1(const T& x) { return expm1_nonpos(x); }
};

template <typename scalar_t, typename target_t, typename Policy>
void divergence_rows_cpu(const scalar_t* x, const target_t* t, RowLayout rx, RowLayout rt, const bool* mask,
                  at::opmath_type<scalar_t>* loss, scalar_t* gx, target_t* gt, int64_t N, int64_t V, TargetType tt, double temperature,
                         at::opmath_type<scalar_t> gs, at::opmath_type<scalar_t>* shard,
                         const at::opmath_type<scalar_t>* given, const Policy& terms) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = padded(V, L);
  const acc_t inv_T = acc_t(1.0 / temperature);
  const bool keep = gx != nullptr || gt != nullptr, logits = tt == TargetType::Logits;
  const bool lp = tt == TargetType::LogProbs;

  for_each_row(mask, loss, gx, gt, N, V, V, 6 * np, [&](int64_t r, int64_t off, acc_t* buf) {
    // a: student logits / T, then ls, then gq; c: teacher (log domain), then lt, then gp; qb, pd: q and p.
    const auto [a, qb, c, pd, stage_x, stage_t, mx_s, mx_t] = stage_pair(x + rx(r), t + rt(r), buf, V, np, inv_T, tt);
    // Exp pass: the softmax sums (fp32 vectors folded into double per 64 vectors, as for the KL).
    const acc_t sh_s = safe_shift(mx_s), sh_t = safe_shift(mx_t);
    double sum_s64 = 0, sum_t64 = 0;
    for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
      V_t vs(0), vt(0);
      for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) {
        const V_t eq = (V_t::loadu(a + i) - V_t(sh_s)).exp_u20();
        eq.store(qb + i);
        vs += eq;
        if (logits) {
          const V_t ep = (V_t::loadu(c + i) - V_t(sh_t)).exp_u20();
          ep.store(pd + i);
          vt += ep;
        } else if (lp) {
          const V_t ep = V_t::loadu(c + i).exp_u20();
          ep.store(pd + i);
          vt += ep;
        } else {
          const V_t p = V_t::loadu(pd + i);
          log_poly(p).store(c + i);
          vt += p;
        }
      }
      sum_s64 += hsum(vs);
      sum_t64 += hsum(vt);
    }
    RowStats<acc_t> ss = stats(mx_s, acc_t(sum_s64));
    RowStats<acc_t> st = logits ? stats(mx_t, acc_t(sum_t64)) : RowStats<acc_t>{acc_t(0), acc_t(1), acc_t(sum_t64)};
    const acc_t* g = given != nullptr ? given + 4 * r : nullptr;
    if (shard != nullptr && g == nullptr) {  // vocab-parallel statistics pass
      put_shard_stats(shard + 3 * r, acc_t(0), ss, st, logits);
      return;
    }
    if (g != nullptr) {  // finishing pass: the whole row's statistics
      ss = given_stats(g[0], sh_s, true);
      st = given_stats(g[1], sh_t, logits);
    }
    // Loss pass: terms and the gradient sums sum q gq, sum p gp.
    double loss64 = 0, sq64 = 0, sp64 = 0;
    for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
      V_t vl(0), vq(0), vp(0);
      for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) {
        const V_t ls = V_t::loadu(a + i) - V_t(ss.lse), lt = V_t::loadu(c + i) - V_t(st.lse);
        const V_t q = V_t::loadu(qb + i) * V_t(ss.inv), p = V_t::loadu(pd + i) * V_t(st.inv);
        const DivTerms<V_t> e = terms(ls, lt, q, p);
        const V_t qg = where_pos(q, q * e.gq), ph = where_pos(p, p * e.gp);
        vl += e.f;
        vq += qg;
        vp += ph;
        if (keep) {
          q.store(qb + i);
          p.store(pd + i);
          e.gq.store(a + i);
          // Probs targets: gp is their gradient; where p = q = 0 the entry has none.
          (lp || logits ? e.gp : where_pos(p + q, e.gp)).store(c + i);
        }
      }
      loss64 += hsum(vl);
      sq64 += hsum(vq);
      sp64 += hsum(vp);
    }
    if (shard == nullptr) {
      loss[r] = acc_t(loss64);
    } else {  // this shard's sums; the gradients take the whole row's
      shard[2 * r] = acc_t(sq64);
      shard[2 * r + 1] = acc_t(sp64);
      sq64 = g[2];
      sp64 = g[3];
    }
    if (!keep) return;

    const V_t Vsq(static_cast<acc_t>(sq64)), Vsp(static_cast<acc_t>(sp64)), Vgx(inv_T * gs),
        Vgt(logits ? inv_T * gs : gs);
    for (int64_t i = 0; i < np; i += L) {
      const V_t q = V_t::loadu(qb + i), p = V_t::loadu(pd + i);
      if (gx) put_grad<scalar_t, acc_t>(where_pos(q, q * (V_t::loadu(a + i) - Vsq)) * Vgx, gx + off, stage_x, i, V);
      if (gt) {
        const V_t h = V_t::loadu(c + i);
        const V_t gv = logits ? where_pos(p, p * (h - Vsp)) : lp ? where_pos(p, p * h) : h;
        put_grad<target_t, acc_t>(gv * Vgt, gt + off, stage_t, i, V);
      }
    }
    if (gx) flush_grad(gx + off, stage_x, V);
    if (gt) flush_grad(gt + off, stage_t, V);
  });
}

struct DivergenceRowsCpu {
  static void run(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                  const c10::optional<at::Tensor>& mask, double temperature,
                  const c10::optional<at::Tensor>& grad_scale) {
    const int64_t N = num_rows(input), V = input.size(-1);
    dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto xv, auto tv) {
      using scalar_t = decltype(xv);
      using target_t = decltype(tv);
      using acc_t = at::opmath_type<scalar_t>;
      with_divergence<VecMath<acc_t>>(call.divergence, acc_t(call.param), [&](const auto& terms) {
        divergence_rows_cpu<scalar_t, target_t>(
            input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), row_layout(input),
            row_layout(target), mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
            call.loss.mutable_data_ptr<acc_t>(), call.gx.numel() ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
            call.gt.numel() ? call.gt.mutable_data_ptr<target_t>() : nullptr, N, V, call.target_type, temperature,
            grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1),
            call.shard.defined() ? call.shard.mutable_data_ptr<acc_t>() : nullptr,
            call.given.defined() ? call.given.const_data_ptr<acc_t>() : nullptr, terms);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) {
  m.impl("divergence_with_logits_fwd", &divergence_with_logits_fwd<DivergenceRowsCpu>);
}

}  // namespace kl_ext
