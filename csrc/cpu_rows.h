// The CPU kernels' row machinery, shared by the row-softmax losses (kl_div_with_logits, jsd_with_logits): a row
// is staged in per-thread buffers of the accumulation type (padded to whole vectors), its softmax statistics
// taken from them, and gradients written back through a staging buffer for 16-bit outputs.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_math.h"

namespace kl_ext {
namespace cpu {

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

// Stage a row in acc_t, times `scale`, padded with `pad`; returns the row's max (over the padded row).
template <typename scalar_t, typename acc_t>
acc_t load_row(const scalar_t* src, acc_t* dst, int64_t n, int64_t np, acc_t scale, acc_t pad) {
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const acc_t* from = dst;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    from = src;  // read the input directly: one pass over it
  } else {
    at::vec::convert(src, dst, n);
  }
  V_t vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V_t v = V_t::loadu(from + i) * V_t(scale);
    v.store(dst + i);
    vmax = at::vec::maximum(vmax, v);
  }
  if (i < n) {
    const V_t v = V_t::set(V_t(pad), V_t::loadu(from + i, n - i) * V_t(scale), n - i);
    v.store(dst + i);
    vmax = at::vec::maximum(vmax, v);
  }
  return at::vec::vec_reduce_all<acc_t>([](V_t& a, V_t& b) { return at::vec::maximum(a, b); }, vmax);
}

// Write a gradient vector for elements [i, i + L) of a row of n, straight to the output for acc_t outputs,
// through the staging buffer otherwise (converted once per row by flush_grad).
template <typename scalar_t, typename acc_t>
inline void put_grad(const Vec<acc_t>& g, scalar_t* out, acc_t* stage, int64_t i, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    g.store(out + i, std::min<int64_t>(Vec<acc_t>::size(), n - i));
  } else {
    g.store(stage + i);
  }
}

template <typename scalar_t, typename acc_t>
inline void flush_grad(scalar_t* out, const acc_t* stage, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(stage, out, n);
}

template <typename T>
T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// Softmax statistics of a row from its max: log-sum-exp and 1/sum. A row that is entirely -inf has no mass:
// we define its log-probs as -inf (lse = +inf) and its probs as 0 (inv = 0).
template <typename T>
struct RowStats {
  T lse, inv, mass;
};

template <typename T>
RowStats<T> stats(T mx, T sum) {
  if (mx == -std::numeric_limits<T>::infinity()) return {std::numeric_limits<T>::infinity(), T(0), T(0)};
  return {mx + std::log(sum), T(1) / sum, T(1)};
}

// log of a side's mass from its statistics: the log-sum-exp, -inf where there is none.
template <typename T>
inline T log_mass(const RowStats<T>& s) {
  return s.mass > 0 ? s.lse : -std::numeric_limits<T>::infinity();
}

// The vocab-parallel statistics pass (csrc/common.h): the row's loss on this shard alone and the log-masses of
// student and teacher (a target that is not logits: the log of its sum, which st.mass holds).
template <typename T>
inline void put_shard_stats(T* o, T loss, const RowStats<T>& ss, const RowStats<T>& st, bool logits) {
  o[0] = loss;
  o[1] = log_mass(ss);
  o[2] = logits ? log_mass(st) : std::log(st.mass);
}

// The statistics of a whole row for one shard of it (the vocab-parallel finishing pass, csrc/common.h), from the
// row's log-mass lm, for values staged relative to `shift` (exp(v - shift) * inv = exp(v - lse)). Targets that
// are not logits are used as given: lse 0, inv 1, and their mass.
template <typename T>
inline RowStats<T> given_stats(T lm, T shift, bool normalized) {
  if (!normalized) return {T(0), T(1), std::exp(lm)};
  if (lm == -std::numeric_limits<T>::infinity()) return {std::numeric_limits<T>::infinity(), T(0), T(0)};
  return {lm, std::exp(shift - lm), T(1)};
}

template <typename T>
inline T safe_shift(T mx) {
  return mx == -std::numeric_limits<T>::infinity() ? T(0) : mx;
}

// A masked row: loss 0, gradients 0 (Vt: the length of a teacher row).
template <typename scalar_t, typename acc_t, typename target_t>
inline void zero_row(acc_t* loss, scalar_t* gx, target_t* gt, int64_t r, int64_t V, int64_t Vt) {
  loss[r] = 0;
  if (gx) std::fill(gx + r * V, gx + (r + 1) * V, scalar_t(0));
  if (gt) std::fill(gt + r * Vt, gt + (r + 1) * Vt, target_t(0));
}

// exp(a - shift) into e over a padded row; returns the sum (fp32 vectors folded into double per 64 vectors).
// The row losses take exp within 20 ulp (ATen's exp_u20, as Inductor's CPU code does; Sleef's u10 exp is a call
// per vector): the fp32 sums it feeds round more than that.
template <typename T>
double exp_row(const T* a, T* e, int64_t np, T shift) {
  constexpr int64_t L = Vec<T>::size();
  double sum = 0;
  for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
    Vec<T> v(0);
    for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) {
      const Vec<T> x = (Vec<T>::loadu(a + i) - Vec<T>(shift)).exp_u20();
      x.store(e + i);
      v += x;
    }
    sum += hsum(v);
  }
  return sum;
}

// The sum of a padded row, folded into double as exp_row's.
template <typename T>
double sum_row(const T* e, int64_t np) {
  constexpr int64_t L = Vec<T>::size();
  double sum = 0;
  for (int64_t i0 = 0; i0 < np; i0 += 64 * L) {
    Vec<T> v(0);
    for (int64_t i = i0; i < std::min(np, i0 + 64 * L); i += L) v += Vec<T>::loadu(e + i);
    sum += hsum(v);
  }
  return sum;
}

// Stage the teacher row: logits -> c = t / T (returns its max); log-probs -> c = t; probs -> d = t (returns 0).
template <typename scalar_t, typename acc_t>
acc_t stage_teacher(const scalar_t* t, acc_t* c, acc_t* d, int64_t V, int64_t np, acc_t inv_T, TargetType tt) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (tt == TargetType::Logits) return load_row(t, c, V, np, inv_T, ninf);
  const bool lp = tt == TargetType::LogProbs;
  load_row(t, lp ? c : d, V, np, acc_t(1), lp ? ninf : acc_t(0));
  return acc_t(0);
}

// A row pair staged for a row-softmax loss, in six buffers of np values: a the student logits / T; c the teacher
// in the log domain (logits / T, or log-probs) and d its probs for probs targets; b free; stage_x, stage_t the
// gradients' staging. mx_s, mx_t: the maxima of a and c (0 for c unless logits).
template <typename acc_t>
struct StagedPair {
  acc_t *a, *b, *c, *d, *stage_x, *stage_t;
  acc_t mx_s, mx_t;
};

template <typename scalar_t, typename target_t, typename acc_t>
StagedPair<acc_t> stage_pair(const scalar_t* x, const target_t* t, acc_t* buf, int64_t V, int64_t np, acc_t inv_T,
                             TargetType tt) {
  StagedPair<acc_t> s{buf, buf + np, buf + 2 * np, buf + 3 * np, buf + 4 * np, buf + 5 * np, acc_t(0), acc_t(0)};
  s.mx_s = load_row(x, s.a, V, np, inv_T, -std::numeric_limits<acc_t>::infinity());
  s.mx_t = stage_teacher(t, s.c, s.d, V, np, inv_T, tt);
  return s;
}

// The rows of a row-softmax loss over threads: each thread has `staging` values of buffer (buf); masked rows
// get loss 0 and zero gradients (gt: rows of Vt); row(r, r * V, buf) does the rest.
template <typename scalar_t, typename acc_t, typename target_t, typename F>
void for_each_row(const bool* mask, acc_t* loss, scalar_t* gx, target_t* gt, int64_t N, int64_t V, int64_t Vt,
                  int64_t staging, const F& row) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(staging);
    for (int64_t r = begin; r < end; ++r) {
      if (mask != nullptr && !mask[r]) {
        zero_row(loss, gx, gt, r, V, Vt);
      } else {
        row(r, r * V, buf.data());
      }
    }
  });
}

}  // namespace cpu
}  // namespace kl_ext
