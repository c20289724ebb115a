// sparse_kl_div_with_logits: CPU kernel (schema: kl_ext/_ops.py). KL(teacher || student) with the teacher given
// on a support S of k entries per row (cached top-k), over the student's full softmax ls = log_softmax(input / T):
//   teacher log-weights w_i: logits v / T, log-probs v, probs log v (empty slots, index -1, are skipped);
//   normalized (target "logits", or tail "renorm"): lp = w - lse_S(w), p = exp(lp), no tail term;
//   "bucket": lp = w, p the given probs, p_tail = max(-expm1(lse_S(w)), 0) (0 when S covers every class),
//   row loss = sum_S p (lp - ls) + p_tail (log p_tail - log Q_tail),  Q_tail = sum_{j not in S} q_j.
// Q_tail is summed over the entries outside S (1 - sum_S q would cancel when S holds nearly all of q).
// Gradients, with P = sum_S p and c = P + p_tail: d/dz_j = c q_j - p_j on S and c q_j - p_tail q_j / Q_tail
// elsewhere (z = input / T); w.r.t. the values, per slot, from d_i = lp_i - ls_i and the row's head sum
// H = sum_S p d: normalized p (d - H) times dw/dv; bucket log-probs p (d + 1 - t), probs d + 1 - t, with
// t = log p_tail - log Q_tail + 1 where p_tail > 0 (else 0).
//
// Per row: the student row is staged (load + max, exp + sum); the support gathered from the staged row; its
// entries of exp zeroed, so the tail sum is one more pass; the gradient is one pass plus k scattered writes.
#include <torch/library.h>

#include "common.h"
#include "cpu_rows.h"

namespace kl_ext {
namespace {

using namespace cpu;

template <typename scalar_t>
void sparse_rows_cpu(const scalar_t* x, RowLayout rx, const int64_t* ind, const at::opmath_type<scalar_t>* val, const bool* mask,
                     at::opmath_type<scalar_t>* loss, scalar_t* gx, at::opmath_type<scalar_t>* gv, int64_t N,
                     int64_t V, int64_t K, TargetType tt, bool normalize, double temperature,
                     at::opmath_type<scalar_t> gs) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = padded(V, L);
  const acc_t inv_T = acc_t(1.0 / temperature), ninf = -std::numeric_limits<acc_t>::infinity();

  for_each_row(mask, loss, gx, gv, N, V, K, 3 * np + 3 * K, [&](int64_t r, int64_t off, acc_t* buf) {
    // a: student logits / T; e: their exp (support entries then zeroed); per slot: d (student logit, then
    // lp - ls), es (its exp), w (the teacher's prob).
    acc_t *a = buf, *e = a + np, *stage = e + np, *d = stage + np, *es = d + K, *w = es + K;
    const int64_t* id = ind + r * K;
    const acc_t* v = val + r * K;
    const acc_t mx = load_row(x + rx(r), a, V, np, inv_T, ninf);
    const double sum_all = exp_row(a, e, np, safe_shift(mx));
    // The teacher's log-weights in double: the tail bucket 1 - sum_S p is a difference near 1 - 1, so its sums
    // are taken from the exact values (k per row: cheap).
    const auto log_weight = [&](int64_t s) {
      return tt == TargetType::Logits ? double(v[s]) * inv_T : tt == TargetType::LogProbs ? double(v[s]) : std::log(double(v[s]));
    };
    int64_t nvalid = 0;
    double mw = -std::numeric_limits<double>::infinity();
    for (int64_t s = 0; s < K; ++s) {
      const int64_t i = id[s];
      TORCH_CHECK(i >= -1 && i < V, "kl_ext: target_indices holds ", i, " (row ", r, ", slot ", s,
                  "), outside [-1, ", V, "): indices must be classes of the input's last dim, or -1 for an empty slot");
      if (i < 0) continue;
      d[s] = a[i];
      es[s] = e[i];
      mw = std::max(mw, log_weight(s));
      ++nvalid;
    }
    for (int64_t s = 0; s < K; ++s) {
      if (id[s] >= 0) e[id[s]] = 0;
    }
    const double sum_tail = sum_row(e, np);
    double sw = 0;
    for (int64_t s = 0; s < K; ++s) {
      if (id[s] >= 0) sw += std::exp(log_weight(s) - (std::isinf(mw) ? 0.0 : mw));
    }
    const double lse_w = sw > 0 ? mw + std::log(sw) : -std::numeric_limits<double>::infinity();
    // log-probs as (a - max) - log(sum): no large log-sum-exp (logits of 25 would cost 1e-6 absolute) to cancel.
    const acc_t sh = safe_shift(mx), log_sum = sum_all > 0 ? acc_t(std::log(sum_all)) : -ninf;
    // P: the teacher's mass on S; c = P + p_tail weighs the student's probs in its gradient.
    const acc_t P = normalize ? acc_t(sw > 0) : acc_t(std::exp(lse_w));
    const acc_t p_tail = normalize || nvalid == V ? acc_t(0) : acc_t(std::max(-std::expm1(lse_w), 0.0));
    const acc_t log_qt = sum_tail > 0 ? acc_t(std::log(sum_tail) - std::log(sum_all)) : ninf;
    double head = 0;
    for (int64_t s = 0; s < K; ++s) {
      if (id[s] < 0) continue;
      const acc_t lp = normalize ? (P > 0 ? acc_t(log_weight(s) - lse_w) : ninf) : acc_t(log_weight(s));
      const acc_t p = normalize || tt == TargetType::LogProbs ? std::exp(lp) : v[s];
      d[s] = lp - ((d[s] - sh) - log_sum);
      w[s] = p;
      if (p > 0) head += double(p) * d[s];
    }
    const acc_t tail = p_tail > 0 ? p_tail * (std::log(p_tail) - log_qt) : acc_t(0);
    loss[r] = acc_t(head) + tail;

    if (gx != nullptr) {
      const acc_t c = P + p_tail, f = inv_T * gs;
      const acc_t an = acc_t(c / sum_all - (p_tail > 0 ? p_tail / sum_tail : 0.0));
      for (int64_t i = 0; i < np; i += L) put_grad<scalar_t, acc_t>(V_t::loadu(e + i) * V_t(an * f), gx + off, stage, i, V);
      for (int64_t s = 0; s < K; ++s) {
        if (id[s] < 0) continue;
        const acc_t g = acc_t(c * (es[s] / sum_all)) - w[s];
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          gx[off + id[s]] = g * f;
        } else {
          stage[id[s]] = g * f;
        }
      }
      flush_grad(gx + off, stage, V);
    }
    if (gv != nullptr) {
      const acc_t t = p_tail > 0 ? std::log(p_tail) - log_qt + 1 : acc_t(0), h = acc_t(head);
      const acc_t dw = tt == TargetType::Logits ? inv_T : acc_t(1);
      for (int64_t s = 0; s < K; ++s) {
        const acc_t p = w[s];
        acc_t g = 0;
        if (id[s] < 0) {
        } else if (normalize) {
          // probs: dw/dv = 1 / v, and p / v = exp(-lse_w); -inf at v = 0, as the math says.
          g = tt == TargetType::Probs ? (d[s] - h) * acc_t(std::exp(-lse_w)) : (p > 0 ? p * (d[s] - h) : acc_t(0)) * dw;
        } else {
          g = tt == TargetType::Probs ? d[s] + 1 - t : (p > 0 ? p * (d[s] + 1 - t) : acc_t(0));
        }
        gv[r * K + s] = g * gs;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_div_with_logits_fwd_cpu(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
    const c10::optional<at::Tensor>& mask, c10::string_view target_type, c10::string_view tail, double temperature,
    bool grad_input, bool grad_target, const c10::optional<at::Tensor>& grad_scale) {
  SparseCall call = prepare_sparse(input, indices, values, mask, target_type, tail, temperature, grad_input,
                                   grad_target, grad_scale);
  const int64_t N = num_rows(input), V = input.size(-1), K = indices.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_kl_div_with_logits_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sparse_rows_cpu<scalar_t>(input.const_data_ptr<scalar_t>(), row_layout(input), indices.const_data_ptr<int64_t>(),
                              values.const_data_ptr<acc_t>(), mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
                              call.loss.mutable_data_ptr<acc_t>(),
                              grad_input ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
                              grad_target ? call.gv.mutable_data_ptr<acc_t>() : nullptr, N, V, K, call.target_type,
                              call.normalize, temperature,
                              grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1));
  });
  return {call.loss, call.gx, call.gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) { m.impl("sparse_kl_div_with_logits_fwd", &sparse_kl_div_with_logits_fwd_cpu); }

}  // namespace kl_ext
