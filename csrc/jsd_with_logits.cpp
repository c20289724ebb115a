// jsd_with_logits: op schema + CPU kernel. The generalized Jensen-Shannon divergence of on-policy distillation:
//   m = beta p + (1 - beta) q,  row loss = beta KL(p || m) + (1 - beta) KL(q || m),  0 < beta < 1
// (beta = 0 and 1 are the forward and reverse KL: the Python layer sends those to kl_div_with_logits_fwd).
// log m is never the log of a sum that can underflow (log_mixture); an entry where p and q are both 0
// contributes 0 and a zero gradient; identical rows give exactly 0. Gradients, with g = (1 - beta)(ls - lm) and
// h = beta (lt - lm): d/dz = q (g - sum q g) for the student logits z = input / T; the teacher's the same with
// p and h (logits), p h (log-probs), h (probs).
//
// Per row (staged as in kl_div_with_logits, csrc/cpu_rows.h): load (+ max), exp (+ sums), a loss pass that
// also sums q g and p h and keeps q, p, g, h when a gradient is wanted, and one gradient pass.
#include <torch/library.h>

#include "common.h"
#include "cpu_rows.h"

namespace kl_ext {
namespace {

using namespace cpu;

// log m = log(beta e^lt + (1 - beta) e^ls) from the larger of the two: max(ls, lt) + log1p(c expm1(-|lt - ls|)),
// c = beta where lt <= ls, else 1 - beta. Exactly ls when lt == ls (identical rows: loss 0), never the log of
// a sum that underflows; NaN only where both are -inf, where every use is masked.
template <typename T>
inline Vec<T> log_mixture(const Vec<T>& ls, const Vec<T>& lt, T beta, T beta1) {
  const Vec<T> d = lt - ls, c = Vec<T>::blendv(Vec<T>(beta), Vec<T>(beta1), d > Vec<T>(T(0)));
  return at::vec::maximum(ls, lt) + log1p_poly(c * expm1_nonpos(Vec<T>(T(0)) - d.abs()));
}

template <typename scalar_t, typename target_t>
void jsd_rows_cpu(const scalar_t* x, const target_t* t, RowLayout rx, RowLayout rt, const bool* mask,
                  at::opmath_type<scalar_t>* loss, scalar_t* gx, target_t* gt, int64_t N, int64_t V, TargetType tt, double temperature, double beta,
                  at::opmath_type<scalar_t> gs, at::opmath_type<scalar_t>* shard,
                  const at::opmath_type<scalar_t>* given) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = padded(V, L);
  const acc_t inv_T = acc_t(1.0 / temperature), ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t b = acc_t(beta), b1 = acc_t(1.0 - beta);
  const bool keep = gx != nullptr || gt != nullptr;
  const bool logits = tt == TargetType::Logits, lp = tt == TargetType::LogProbs;

  for_each_row(mask, loss, gx, gt, N, V, V, 6 * np, [&](int64_t r, int64_t off, acc_t* buf) {
    // a: student logits / T, then ls, then g; c: teacher (log domain), then lt, then h; qb, pd: q and p.
    acc_t *a = buf, *qb = a + np, *c = qb + np, *pd = c + np, *stage_x = pd + np, *stage_t = stage_x + np;
    const acc_t mx_s = load_row(x + rx(r), a, V, np, inv_T, ninf);
    const acc_t mx_t = stage_teacher(t + rt(r), c, pd, V, np, inv_T, tt);
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
    // Loss pass: terms and the gradient sums sum q g, sum p h.
    double loss64 = 0, sq64 = 0, sp64 = 0;
    for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
      V_t vl(0), vq(0), vp(0);
      for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) {
        const V_t ls = V_t::loadu(a + i) - V_t(ss.lse), lt = V_t::loadu(c + i) - V_t(st.lse);
        const V_t q = V_t::loadu(qb + i) * V_t(ss.inv), p = V_t::loadu(pd + i) * V_t(st.inv);
        const V_t lm = log_mixture(ls, lt, b, b1);
        const V_t g = V_t(b1) * (ls - lm), h = V_t(b) * (lt - lm);
        const V_t qg = where_pos(q, q * g), ph = where_pos(p, p * h);
        vl += ph + qg;  // beta p (lt - lm) + (1 - beta) q (ls - lm), 0 where the weight is 0
        vq += qg;
        vp += ph;
        if (keep) {
          q.store(qb + i);
          p.store(pd + i);
          g.store(a + i);
          // Probs targets: h is their gradient; where m = 0 (p = q = 0) the entry has none.
          (lp || logits ? h : where_pos(p + q, h)).store(c + i);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd_with_logits_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, double beta, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_jsd(input, target, mask, target_type, temperature, beta, grad_input, grad_target,
                            grad_scale, row_stats);
  const int64_t N = num_rows(input), V = input.size(-1);
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto xv, auto tv) {
    using scalar_t = decltype(xv);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    jsd_rows_cpu<scalar_t, target_t>(
        input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), row_layout(input), row_layout(target),
        mask.has_value() ? mask->const_data_ptr<bool>() : nullptr, call.loss.mutable_data_ptr<acc_t>(),
        grad_input ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
        grad_target ? call.gt.mutable_data_ptr<target_t>() : nullptr, N, V, call.target_type, temperature, beta,
        grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1),
        call.shard.defined() ? call.shard.mutable_data_ptr<acc_t>() : nullptr,
        call.given.defined() ? call.given.const_data_ptr<acc_t>() : nullptr);
  });
  return {call.out(), call.gx, call.gt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kl_ext, m) {
  // Per-row generalized JSD (accumulation dtype, 0 for masked rows), 0 < beta < 1, and, when asked, the
  // gradients of each row's loss w.r.t. input and target times grad_scale; as kl_div_with_logits_fwd, row_stats
  // included.
  m.def(
      "jsd_with_logits_fwd(Tensor input, Tensor target, Tensor? mask, str target_type, float temperature, "
      "float beta, bool grad_input, bool grad_target, Tensor? grad_scale=None, Tensor? row_stats=None) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) { m.impl("jsd_with_logits_fwd", &jsd_with_logits_fwd_cpu); }

}  // namespace kl_ext
