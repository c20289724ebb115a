// kl_div_with_logits: CPU kernel (schema: kl_ext/_ops.py).
//
// Per row: student and teacher are staged in per-thread buffers (accumulation type) that stay in L2, so the
// input is read from memory once; softmax statistics, the row's KL and, when asked, the gradients of that
// row's KL are all computed from those buffers.
// Gradients are those of the row losses times grad_scale (the reduction's 1 / denominator), so the forward of
// a training step already holds the gradient of the loss; backward only multiplies it by grad_output, in place
// (scale_grad_), which costs nothing when grad_output is 1.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_rows.h"

namespace kl_ext {
namespace {

using namespace cpu;

// Row layout in the staging buffers: a = student logits / T, b = exp(a - max_a);
// c = teacher logits / T (logits) or log-probs, d = exp(c - max_c) (logits) or probs. Then
//   ls = a - lse_s, q = b * inv_s, lt = c - lse_t, p = d * inv_t, lt - ls = (c - a) - dlse, dlse = lse_t - lse_s.
// The KL is accumulated on logits shifted by their maxima (a' = a - max_a, c' likewise for logits), so no large
// log-sum-exp terms cancel and identical rows give exactly 0:
//   forward KL = inv_t * sum d (c' - a') - mass_p * (log sum_t - log sum_s)   (log sum_t = 0 unless logits),
//   reverse KL = inv_s * sum b (a' - c') + mass_q * (log sum_t - log sum_s).
// Passes: load (+ max), exp (+ sums and the KL accumulator; b and d are kept only when a gradient is wanted),
// and one gradient pass.
template <typename scalar_t, typename target_t>
void kl_rows_cpu(const scalar_t* x, const target_t* t, RowLayout rx, RowLayout rt, const bool* mask,
                 at::opmath_type<scalar_t>* loss, scalar_t* gx, target_t* gt, int64_t N, int64_t V, TargetType tt, Direction dir,
                 double temperature, at::opmath_type<scalar_t> gs, at::opmath_type<scalar_t>* shard,
                 const at::opmath_type<scalar_t>* given) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = padded(V, L);
  const acc_t inv_T = acc_t(1.0 / temperature);
  const acc_t gx_f = inv_T * gs;  // d/d input = (1/T) d/dz, times the reduction's grad_scale
  const bool fwd = dir == Direction::Forward;
  const bool keep = gx != nullptr || gt != nullptr;
  const bool logits = tt == TargetType::Logits, lp = tt == TargetType::LogProbs;

  for_each_row(mask, loss, gx, gt, N, V, V, 6 * np, [&](int64_t r, int64_t off, acc_t* buf) {
    const auto [a, b, c, d, stage_x, stage_t, mx_s, mx_t] = stage_pair(x + rx(r), t + rt(r), buf, V, np, inv_T, tt);
    const acc_t sh_s = safe_shift(mx_s), sh_t = safe_shift(mx_t);
    // Exp pass: sums of both rows and the KL accumulator (terms of zero weight are 0: 0 log 0 = 0), in fp32
    // vectors over blocks of 64 vectors folded into double: one running fp32 sum of V exponentials would be
    // off by ~1e-7 relative, as much as a whole tiny KL between near-identical rows.
    double sum_s64 = 0, sum_t64 = 0, acc64 = 0;
    for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
      V_t vs_s(0), vs_t(0), vacc(0);
      for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) {
        const V_t av = V_t::loadu(a + i) - V_t(sh_s);  // shifted
        const V_t eb = av.exp_u20();
        V_t cv, ed;
        if (logits) {
          cv = V_t::loadu(c + i) - V_t(sh_t);  // shifted
          ed = cv.exp_u20();
        } else if (lp) {
          cv = V_t::loadu(c + i);
          ed = cv.exp_u20();
        } else {
          ed = V_t::loadu(d + i);
          cv = log_poly(ed);
          cv.store(c + i);
        }
        vs_s += eb;
        vs_t += ed;
        vacc += fwd ? where_pos(ed, ed * (cv - av)) : where_pos(eb, eb * (av - cv));
        if (keep) {
          eb.store(b + i);
          ed.store(d + i);
        }
      }
      sum_s64 += hsum(vs_s);
      sum_t64 += hsum(vs_t);
      acc64 += hsum(vacc);
    }
    const acc_t sum_s = acc_t(sum_s64), sum_t = acc_t(sum_t64), acc = acc_t(acc64);
    RowStats<acc_t> ss = stats(mx_s, sum_s);
    RowStats<acc_t> st = logits ? stats(mx_t, sum_t) : RowStats<acc_t>{acc_t(0), acc_t(1), sum_t};
    // A side with no mass gives 0 (it is the weight) or +inf (the other side has mass where it has none).
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    // log sum_t - log sum_s; for two logit rows from their ratio, which is ~1 for near-identical rows:
    // a difference of two logs of ~log V each would add their rounding (~1e-6 in fp32) to a tiny KL.
    const acc_t dlsum = logits ? acc_t(-std::log1p((sum_s64 - sum_t64) / sum_t64)) : -std::log(sum_s);
    acc_t kl = fwd ? (st.mass == 0 ? acc_t(0) : ss.mass == 0 ? inf : acc * st.inv - st.mass * dlsum)
                   : (ss.mass == 0 ? acc_t(0) : st.mass == 0 ? inf : acc * ss.inv + dlsum);
    if (shard == nullptr) {
      loss[r] = kl;
    } else if (given == nullptr) {  // vocab-parallel statistics pass
      put_shard_stats(shard + 3 * r, kl, ss, st, logits);
      return;
    } else {  // finishing pass: the whole row's statistics
      const acc_t* g = given + 4 * r;
      ss = given_stats(g[0], sh_s, true);
      st = given_stats(g[1], sh_t, logits);
      kl = g[2];
    }
    if (!keep) return;

    const acc_t dlse = st.lse - ss.lse;  // NaN only when both rows have no mass, where every term is 0
    const V_t Vinv_s(ss.inv), Vinv_t(st.inv), Vdlse(dlse), Vkl(kl);
    for (int64_t i = 0; i < np; i += L) {
      const V_t q = V_t::loadu(b + i) * Vinv_s, p = V_t::loadu(d + i) * Vinv_t;
      const bool need_diff = gt != nullptr || !fwd;
      const V_t diff = need_diff ? (V_t::loadu(c + i) - V_t::loadu(a + i)) - Vdlse : V_t(0);  // lt - ls
      if (gx) {
        const V_t gv = fwd ? q * V_t(st.mass) - p : where_pos(q, q * ((V_t(0) - diff) - Vkl));
        put_grad<scalar_t, acc_t>(gv * V_t(gx_f), gx + off, stage_x, i, V);
      }
      if (gt) {
        V_t gv;
        if (fwd) {
          if (logits) gv = where_pos(p, p * (diff - Vkl)) * V_t(inv_T);
          else if (lp) gv = where_pos(p, p * (diff + V_t(1)));
          else gv = diff + V_t(1);  // d/dp [p log p - p ls]; -inf at p = 0, as the math says
        } else {
          if (logits) gv = (p * V_t(ss.mass) - q) * V_t(inv_T);
          else if (lp) gv = V_t(0) - q;
          else gv = where_pos(q, V_t(0) - q / p);
        }
        put_grad<target_t, acc_t>(gv * V_t(gs), gt + off, stage_t, i, V);
      }
    }
    if (gx) flush_grad(gx + off, stage_x, V);
    if (gt) flush_grad(gt + off, stage_t, V);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_with_logits_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view direction, bool grad_input,
    bool grad_target, const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_kl(input, target, mask, target_type, temperature, direction, grad_input, grad_target,
                           grad_scale, row_stats);
  const int64_t N = num_rows(input), V = input.size(-1);
  at::Tensor &loss = call.loss, &gx = call.gx, &gt = call.gt;
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto xv, auto tv) {
    using scalar_t = decltype(xv);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    kl_rows_cpu<scalar_t, target_t>(
        input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), row_layout(input), row_layout(target),
        mask.has_value() ? mask->const_data_ptr<bool>() : nullptr, loss.mutable_data_ptr<acc_t>(),
        grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr, grad_target ? gt.mutable_data_ptr<target_t>() : nullptr,
        N, V, call.target_type, call.direction, temperature,
        grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1),
        call.shard.defined() ? call.shard.mutable_data_ptr<acc_t>() : nullptr,
        call.given.defined() ? call.given.const_data_ptr<acc_t>() : nullptr);
  });
  return {call.out(), gx, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) { m.impl("kl_div_with_logits_fwd", &kl_div_with_logits_fwd_cpu); }

}  // namespace kl_ext
