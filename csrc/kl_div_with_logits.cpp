// kl_div_with_logits: op schema + CPU kernel.
//
// One fused pass per row: the row (student and teacher, converted to the accumulation type) is staged in
// per-thread buffers that stay in L2, so the input is read from memory once; log-softmax statistics, the
// row's KL and, when asked, the gradients of that row's KL are all computed from those buffers.
// Gradients are those of the *row loss*; the autograd layer scales them by grad_output / denominator
// (scale_grad), so the forward of a training step already holds the unscaled gradient.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace kl_ext {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Buffers are padded to a whole number of vectors so every loop is a pure vector loop; the padding holds
// neutral values (probability 0) that contribute nothing.
inline int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

template <typename T>
inline Vec<T> where_pos(const Vec<T>& cond, const Vec<T>& a) {
  // a where cond > 0 else 0: implements 0 * log 0 = 0 without NaN from 0 * inf.
  return Vec<T>::blendv(Vec<T>(T(0)), a, cond > Vec<T>(T(0)));
}

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, acc_t* dst, int64_t n, int64_t np, acc_t scale, acc_t pad) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
  if (scale != acc_t(1)) {
    for (int64_t i = 0; i < np; i += Vec<acc_t>::size()) (Vec<acc_t>::loadu(dst + i) * Vec<acc_t>(scale)).store(dst + i);
  }
  std::fill(dst + n, dst + np, pad);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// z (padded with -inf) -> log_softmax(z) in place, e <- softmax(z). Returns the probability mass (1, or 0
// for a row that is entirely -inf: we define its log-probs as -inf and its probs as 0).
template <typename T>
T log_softmax_row(T* z, T* e, int64_t np) {
  constexpr int64_t L = Vec<T>::size();
  const T ninf = -std::numeric_limits<T>::infinity();
  Vec<T> vmax(ninf);
  for (int64_t i = 0; i < np; i += L) vmax = at::vec::maximum(vmax, Vec<T>::loadu(z + i));
  const T mx = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vmax);
  if (mx == ninf) {
    std::fill(z, z + np, ninf);
    std::fill(e, e + np, T(0));
    return T(0);
  }
  Vec<T> vsum(T(0));
  for (int64_t i = 0; i < np; i += L) {
    Vec<T> ev = (Vec<T>::loadu(z + i) - Vec<T>(mx)).exp();
    ev.store(e + i);
    vsum += ev;
  }
  const T sum = hsum(vsum);
  const T lsum = std::log(sum), inv = T(1) / sum;
  for (int64_t i = 0; i < np; i += L) {
    ((Vec<T>::loadu(z + i) - Vec<T>(mx)) - Vec<T>(lsum)).store(z + i);
    (Vec<T>::loadu(e + i) * Vec<T>(inv)).store(e + i);
  }
  return T(1);
}

template <typename scalar_t>
void kl_rows_cpu(const scalar_t* x, const scalar_t* t, const bool* mask, at::opmath_type<scalar_t>* loss, scalar_t* gx,
                 scalar_t* gt, int64_t N, int64_t V, TargetType tt, Direction dir, double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = padded(V, L);
  const acc_t inv_t = acc_t(1.0 / temperature);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool fwd = dir == Direction::Forward;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    // ls/q: student log-probs and probs; lt/p: teacher log-probs and probs; g: gradient staging.
    std::vector<acc_t> buf(5 * np);
    acc_t *ls = buf.data(), *q = ls + np, *lt = q + np, *p = lt + np, *g = p + np;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * V;
      if (mask != nullptr && !mask[r]) {
        loss[r] = 0;
        if (gx) std::fill(gx + off, gx + off + V, scalar_t(0));
        if (gt) std::fill(gt + off, gt + off + V, scalar_t(0));
        continue;
      }
      load_row(x + off, ls, V, np, inv_t, ninf);
      const acc_t sq = log_softmax_row(ls, q, np);
      acc_t sp = 0;
      if (tt == TargetType::Logits) {
        load_row(t + off, lt, V, np, inv_t, ninf);
        sp = log_softmax_row(lt, p, np);
      } else if (tt == TargetType::LogProbs) {
        load_row(t + off, lt, V, np, acc_t(1), ninf);
        V_t vs(0);
        for (int64_t i = 0; i < np; i += L) {
          V_t pv = V_t::loadu(lt + i).exp();
          pv.store(p + i);
          vs += pv;
        }
        sp = hsum(vs);
      } else {
        load_row(t + off, p, V, np, acc_t(1), acc_t(0));
        V_t vs(0);
        for (int64_t i = 0; i < np; i += L) {
          V_t pv = V_t::loadu(p + i);
          pv.log().store(lt + i);
          vs += pv;
        }
        sp = hsum(vs);
      }

      // Row KL. forward: sum p (lt - ls); reverse: sum q (ls - lt); terms with zero weight are 0.
      V_t vl(0);
      for (int64_t i = 0; i < np; i += L) {
        V_t a = V_t::loadu(ls + i), b = V_t::loadu(lt + i);
        vl += fwd ? where_pos(V_t::loadu(p + i), V_t::loadu(p + i) * (b - a))
                  : where_pos(V_t::loadu(q + i), V_t::loadu(q + i) * (a - b));
      }
      const acc_t kl = hsum(vl);
      loss[r] = kl;

      if (gx) {
        // d KL / d input = (1/T) * d KL / d z, z = input / T.
        for (int64_t i = 0; i < np; i += L) {
          V_t qv = V_t::loadu(q + i), pv = V_t::loadu(p + i);
          V_t gv = fwd ? qv * V_t(sp) - pv
                       : where_pos(qv, qv * ((V_t::loadu(ls + i) - V_t::loadu(lt + i)) - V_t(kl)));
          (gv * V_t(inv_t)).store(g + i);
        }
        store_row(g, gx + off, V);
      }
      if (gt) {
        for (int64_t i = 0; i < np; i += L) {
          V_t qv = V_t::loadu(q + i), pv = V_t::loadu(p + i);
          V_t d = V_t::loadu(lt + i) - V_t::loadu(ls + i);  // lt - ls
          V_t gv;
          if (fwd) {
            if (tt == TargetType::Logits) gv = where_pos(pv, pv * (d - V_t(kl))) * V_t(inv_t);
            else if (tt == TargetType::LogProbs) gv = where_pos(pv, pv * (d + V_t(1)));
            else gv = d + V_t(1);  // d/dp [p log p - p ls]; -inf at p = 0, as the math says
          } else {
            if (tt == TargetType::Logits) gv = (pv * V_t(sq) - qv) * V_t(inv_t);
            else if (tt == TargetType::LogProbs) gv = V_t(0) - qv;
            else gv = where_pos(qv, V_t(0) - qv / pv);
          }
          gv.store(g + i);
        }
        store_row(g, gt + off, V);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_with_logits_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view direction, bool grad_input,
    bool grad_target) {
  check_rows(input, target);
  const TargetType tt = parse_target_type(std::string(target_type));
  const Direction dir = parse_direction(std::string(direction));
  TORCH_CHECK(temperature > 0, "kl_ext: temperature must be > 0");
  const int64_t N = input.size(0), V = input.size(1);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == N && mask->is_contiguous(),
                "kl_ext: mask must be a contiguous bool tensor with one value per row");
  }
  at::Tensor loss = at::empty({N}, input.options().dtype(acc_type(input.scalar_type())));
  at::Tensor gx = grad_input ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor gt = grad_target ? at::empty_like(target) : at::empty({0}, target.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "kl_div_with_logits_fwd_cpu", [&] {
    kl_rows_cpu<scalar_t>(input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
                          mask.has_value() ? mask->const_data_ptr<bool>() : nullptr, loss.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                          grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                          grad_target ? gt.mutable_data_ptr<scalar_t>() : nullptr, N, V, tt, dir, temperature);
  });
  return {loss, gx, gt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kl_ext, m) {
  // Per-row KL (accumulation dtype, 0 for masked rows) and, when asked, the gradients of each row's KL w.r.t. input
  // and target (empty tensors otherwise). input/target: contiguous (rows, V), same dtype.
  m.def(
      "kl_div_with_logits_fwd(Tensor input, Tensor target, Tensor? mask, str target_type, float temperature, "
      "str direction, bool grad_input, bool grad_target) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) { m.impl("kl_div_with_logits_fwd", &kl_div_with_logits_fwd_cpu); }

}  // namespace kl_ext
