// kl_div_with_logits and jsd_with_logits: the CUDA kernels and their host entries (contracts:
// csrc/kl_div_with_logits.cpp, csrc/jsd_with_logits.cpp). Included by csrc/cuda/kl_div_with_logits.cu, and by
// tests/cuda_emu, which runs the same code on the CPU. Both losses share the row machinery (statistics,
// reductions, launch paths); the JSD adds one pass over the row for its loss and gradient sums.
//
// When gradients are wanted, every row is kept in registers so that it is read once, and the loss and both
// gradients come from that read (fwd+bwd = read student + read teacher + write gradient: the floor):
//  * one thread block per row (grid-stride over rows) for rows of up to 4096 16-byte packs (32768 16-bit or
//    16384 fp32 values);
//  * on sm_90, longer rows of up to 8 x 4096 packs are split over a thread-block cluster of 2, 4 or 8
//    blocks, which merge their statistics through distributed shared memory;
//  * otherwise (longer rows, older GPUs) rows are streamed: one pass with online statistics, and a second
//    pass for the gradients. A forward without gradients always streams: one pass reads each input once.
//
// Statistics are online per thread, then merged across the block in a fixed order (deterministic, no atomics).
// Everything is in base 2 (logits pre-scaled by log2(e) / T, so every exponential is one exp2): per row,
// the running maxima m_s, m_t, the sums of exp2 d_s, d_t, and the KL accumulator kept relative to the
// maxima, so KL(p || p) is exactly 0 and no large log-sum-exp terms cancel (as in triton_kernels/).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "common.cuh"

namespace kl_ext {
namespace cuda {

// The target may be of another dtype than the input (csrc/common.h, dispatch_pair): each is read in its own.
template <typename scalar_t, typename target_t = scalar_t>
struct KLArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const target_t* t;
  RowLayout rx, rt;     // where rows of x and t start (gradients: row * V)
  const bool* mask;     // nullptr: every row counts
  acc_t* loss;          // (N,)
  scalar_t* gx;         // nullptr: not wanted
  target_t* gt;         // nullptr: not wanted
  const acc_t* gs;      // grad_scale on the device, nullptr: 1
  int64_t N, V;
  acc_t inv_t;          // 1 / temperature
  TargetType target;
  bool forward;         // direction (KL)
  acc_t beta;           // JSD: 0 < beta < 1
  acc_t* shard;         // vocab-parallel modes (csrc/common.h, KLCall), nullptr: none
  const acc_t* given;   // (N, 4) of the finishing pass, nullptr: the statistics pass (or none)
};

// Online statistics of (part of) a row, base 2. For teacher probs / log-probs, m_t and d_t are unused and s_p
// is the teacher's mass. acc, relative to the maxima:
//   forward, logits:  sum e_t (lt - zs)   reverse, logits:  sum e_s (zs - lt)   (both rows shifted)
//   forward, probs:   sum p (lt - zs)     reverse, probs:   sum e_s (zs - lt)   (student shifted)
template <typename T>
struct RowState {
  T m_s, d_s, m_t, d_t, acc, s_p;
};

template <typename T>
__host__ __device__ __forceinline__ RowState<T> empty_state() {
  return {-kinf<T>(), T(0), -kinf<T>(), T(0), T(0), T(0)};
}

template <typename T>
struct Move {
  T scale, delta;  // exp2(m_old - m_new), m_new - m_old (both 0 while nothing with mass was seen)
};

template <typename T>
__host__ __device__ __forceinline__ Move<T> move(T m_old, T m_new) {
  if (m_old == -kinf<T>()) return {T(0), T(0)};
  return {kexp2(m_old - m_new), m_new - m_old};
}

// The same statistics relative to new maxima (ms >= s.m_s, mt >= s.m_t).
template <typename T>
__host__ __device__ __forceinline__ RowState<T> rebase(const RowState<T>& s, T ms, T mt, bool logits, bool fwd) {
  const Move<T> S = move(s.m_s, ms);
  RowState<T> r = s;
  r.m_s = ms;
  r.d_s = s.d_s * S.scale;
  if (logits) {
    const Move<T> U = move(s.m_t, mt);
    r.m_t = mt;
    r.d_t = s.d_t * U.scale;
    r.acc = fwd ? U.scale * (s.acc + s.d_t * (S.delta - U.delta)) : S.scale * (s.acc + s.d_s * (U.delta - S.delta));
  } else {
    r.acc = fwd ? s.acc + s.s_p * S.delta : S.scale * (s.acc - s.d_s * S.delta);
  }
  return r;
}

// A few values reduced together (row maxima, row sums).
template <typename T, int N>
struct Vals {
  T v[N];
};

// Warp shuffles of the reduced types, field by field.
template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int o) {
  return __shfl_xor_sync(0xffffffffu, x, o);
}
template <typename T, int N>
__device__ __forceinline__ Vals<T, N> shfl_xor(Vals<T, N> x, int o) {
#pragma unroll
  for (int i = 0; i < N; ++i) x.v[i] = shfl_xor(x.v[i], o);
  return x;
}
// Commutative reductions (a butterfly then leaves every lane with the same value).
struct MaxOp {
  template <typename T, int N>
  __host__ __device__ __forceinline__ Vals<T, N> operator()(Vals<T, N> a, const Vals<T, N>& b) const {
    for (int i = 0; i < N; ++i) a.v[i] = kmax(a.v[i], b.v[i]);
    return a;
  }
};
struct SumOp {
  template <typename T, int N>
  __host__ __device__ __forceinline__ Vals<T, N> operator()(Vals<T, N> a, const Vals<T, N>& b) const {
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
};
// op over the whole block, in every thread, in a fixed order (deterministic). red: 32 values of shared memory.
template <typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, V* red, V identity, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  if (nwarps == 1) return v;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? red[lane] : identity;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  v = red[0];
  __syncthreads();  // red is written again by the next reduction
  return v;
}

// Teacher element -> (log2-domain log-prob or logit, prob). Logits: p is filled in by the caller.
template <typename T>
__host__ __device__ __forceinline__ T teacher_log2(T t, TargetType tt, T scale2, T& p) {
  if (tt == TargetType::Logits) return kmul(t, scale2);
  if (tt == TargetType::LogProbs) {
    const T l = kmul(t, T(kLog2e));
    p = kexp2(l);
    return l;
  }
  p = t;
  return klog2(t);
}

// Fold packs j0 + k * stride (k < K, below npacks) into this thread's statistics, one pack at a time: the
// pack's maxima, a rebase when they moved (rare after the first packs), then one exp2 per element and side.
// Pack by pack keeps few converted values live (a whole-chunk max first made the compiler keep all of them).
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ void fold(RowState<T>& st, const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                     int64_t j0, int64_t stride, int64_t npacks,
                                     const KLArgs<scalar_t, target_t>& a, T scale2) {
  const bool logits = a.target == TargetType::Logits, fwd = a.forward;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (j0 + k * stride >= npacks) continue;
    // scale2 > 0, so the max of the raw values, scaled, is the max of the scaled values.
    T pm_s = to_acc(px[k].v[0]), pm_t = to_acc(pt[k].v[0]);
#pragma unroll
    for (int e = 1; e < VEC; ++e) {
      pm_s = kmax(pm_s, to_acc(px[k].v[e]));
      if (logits) pm_t = kmax(pm_t, to_acc(pt[k].v[e]));
    }
    pm_s = kmul(pm_s, scale2);
    pm_t = kmul(pm_t, scale2);
    if (pm_s > st.m_s || (logits && pm_t > st.m_t)) {
      st = rebase(st, kmax(st.m_s, pm_s), logits ? kmax(st.m_t, pm_t) : st.m_t, logits, fwd);
    }
    const T sh_s = safe_shift(st.m_s), sh_t = safe_shift(st.m_t);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T zs = kmul(to_acc(px[k].v[e]), scale2) - sh_s, es = kexp2(zs);
      T p = T(0);
      T lt = teacher_log2(to_acc(pt[k].v[e]), a.target, scale2, p);
      if (logits) {
        lt -= sh_t;
        p = kexp2(lt);
        st.d_t += p;
      } else {
        st.s_p += p;
      }
      st.d_s += es;
      // Terms of zero weight are 0 (0 log 0 = 0), never 0 * inf. (Unused by the JSD.)
      st.acc += fwd ? (p > T(0) ? p * (lt - zs) : T(0)) : (es > T(0) ? es * (zs - lt) : T(0));
    }
  }
}

template <typename T>
struct RowResult {
  T kl;              // natural units
  T lse_s, lse_t;    // base 2; +inf for a row with no mass (its log-probs are -inf, its probs 0)
  T mass_s, mass_t;  // 1 or 0 (teacher probs / log-probs: their sum)
};

template <typename T>
__host__ __device__ __forceinline__ RowResult<T> finish(const RowState<T>& st, T rel, bool logits, bool fwd) {
  const T inf = kinf<T>();
  const bool has_s = st.d_s > T(0);
  RowResult<T> r;
  r.lse_s = has_s ? st.m_s + klog2(st.d_s) : inf;
  r.mass_s = has_s ? T(1) : T(0);
  T kl2;
  if (logits) {
    const bool has_t = st.d_t > T(0);
    r.lse_t = has_t ? st.m_t + klog2(st.d_t) : inf;
    r.mass_t = has_t ? T(1) : T(0);
    // log2(d_s / d_t) from the ratio, ~1 for near-identical rows: a difference of two logs of ~log V each
    // would add their rounding to a tiny KL.
    const T dlog = klog1p(rel) * T(kLog2e);
    kl2 = fwd ? (has_t ? (has_s ? st.acc / st.d_t + dlog : inf) : T(0))
              : (has_s ? (has_t ? st.acc / st.d_s - dlog : inf) : T(0));
  } else {
    r.lse_t = T(0);
    r.mass_t = st.s_p;
    kl2 = fwd ? (st.s_p > T(0) ? (has_s ? st.acc + st.s_p * klog2(st.d_s) : inf) : T(0))
              : (has_s ? st.acc / st.d_s - klog2(st.d_s) : T(0));
  }
  r.kl = kl2 * T(kLn2);
  return r;
}

// Vocab-parallel statistics pass (csrc/common.h): the row's loss on this shard alone (0 for the JSD) and the
// natural log-masses of student and teacher (-inf where none).
template <typename T>
__host__ __device__ __forceinline__ void put_shard_stats(T* o, const RowResult<T>& r, bool logits, bool jsd) {
  const T ln2 = T(kLn2), inf = kinf<T>();
  o[0] = jsd ? T(0) : r.kl;
  o[1] = r.mass_s > T(0) ? r.lse_s * ln2 : -inf;
  o[2] = logits ? (r.mass_t > T(0) ? r.lse_t * ln2 : -inf) : klog(r.mass_t);
}

// The finishing pass: the whole row's statistics from its log-masses g[0], g[1] and its loss g[2] (the KL's
// gradients take it); targets that are not logits are used as given, with their mass.
template <typename T>
__host__ __device__ __forceinline__ RowResult<T> given_result(const T* g, bool logits) {
  const T inf = kinf<T>(), l2e = T(kLog2e);
  RowResult<T> r;
  r.kl = g[2];
  r.mass_s = g[0] > -inf ? T(1) : T(0);
  r.lse_s = g[0] > -inf ? g[0] * l2e : inf;
  r.mass_t = logits ? (g[1] > -inf ? T(1) : T(0)) : kexp(g[1]);
  r.lse_t = logits ? (g[1] > -inf ? g[1] * l2e : inf) : T(0);
  return r;
}

// An element's student and teacher log-probs (natural log) and probs, from the row's statistics.
template <typename T>
struct ElemProbs {
  T ls, q, lt, p;
};

template <typename T>
__device__ __forceinline__ ElemProbs<T> elem_probs(T xv, T tv, const RowResult<T>& r, TargetType tt, T scale2) {
  const T ln2 = T(kLn2);
  const T ls2 = kmul(xv, scale2) - r.lse_s;
  ElemProbs<T> e{ls2 * ln2, kexp2(ls2), T(0), T(0)};
  if (tt == TargetType::Logits) {
    const T lt2 = kmul(tv, scale2) - r.lse_t;
    e.p = kexp2(lt2);
    e.lt = lt2 * ln2;
  } else if (tt == TargetType::LogProbs) {
    e.lt = tv;
    e.p = kexp(tv);
  } else {
    e.p = tv;
    e.lt = klog(tv);
  }
  return e;
}

// Gradient packs j0 + k * stride below npacks of the rows at gx + off and gt + off (nullptr: not wanted):
// elem(k, e, gx, gt) sets element e of pack k of each.
template <int K, typename scalar_t, int VEC, typename target_t, typename F>
__device__ __forceinline__ void store_grads(int64_t j0, int64_t stride, int64_t npacks, int64_t off, scalar_t* gx,
                                            target_t* gt, const F& elem) {
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = j0 + k * stride;
    if (j >= npacks) continue;
    P ox;
    PT ot;
#pragma unroll
    for (int e = 0; e < VEC; ++e) elem(k, e, ox.v[e], ot.v[e]);
    if (gx != nullptr) reinterpret_cast<P*>(gx + off)[j] = ox;
    if (gt != nullptr) reinterpret_cast<PT*>(gt + off)[j] = ot;
  }
}

// Gradients of the row's KL for packs j0 + k * stride, times grad_scale.
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ void write_grads(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                            int64_t j0, int64_t stride, int64_t npacks, int64_t off,
                                            const RowResult<T>& r, const KLArgs<scalar_t, target_t>& a, T scale2,
                                            T gs) {
  const TargetType tt = a.target;
  const bool fwd = a.forward;
  const T gx_f = a.inv_t * gs;
  store_grads<K, scalar_t, VEC>(j0, stride, npacks, off, a.gx, a.gt, [&](int k, int e, scalar_t& ox, target_t& ot) {
    const ElemProbs<T> v = elem_probs(to_acc(px[k].v[e]), to_acc(pt[k].v[e]), r, tt, scale2);
    const T ls = v.ls, q = v.q, lt = v.lt, p = v.p;
    if (a.gx != nullptr) {
      const T g = fwd ? q * r.mass_t - p : (q > T(0) ? q * ((ls - lt) - r.kl) : T(0));
      ox = static_cast<scalar_t>(g * gx_f);
    }
    if (a.gt != nullptr) {
      T g;
      if (fwd) {
        if (tt == TargetType::Logits) g = (p > T(0) ? p * ((lt - ls) - r.kl) : T(0)) * a.inv_t;
        else if (tt == TargetType::LogProbs) g = p > T(0) ? p * (lt - ls + T(1)) : T(0);
        else g = lt - ls + T(1);  // -inf at p = 0, as the math says
      } else {
        if (tt == TargetType::Logits) g = (p * r.mass_s - q) * a.inv_t;
        else if (tt == TargetType::LogProbs) g = -q;
        else g = q > T(0) ? -q / p : T(0);
      }
      ot = static_cast<target_t>(g * gs);
    }
  });
}

template <int K, typename scalar_t, int VEC, typename target_t>
__device__ __forceinline__ void load_packs(Pack<scalar_t, VEC>* px, Pack<target_t, VEC>* pt,
                                           const Pack<scalar_t, VEC>* xr, const Pack<target_t, VEC>* tr, int64_t j0,
                                           int64_t stride, int64_t npacks) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = j0 + k * stride;
    if (j < npacks) {
      px[k] = xr[j];
      pt[k] = tr[j];
    }
  }
}

// The same for a row of one operand.
template <int K, typename scalar_t, int VEC>
__device__ __forceinline__ void load_packs(Pack<scalar_t, VEC>* px, const Pack<scalar_t, VEC>* xr, int64_t j0,
                                           int64_t stride, int64_t npacks) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = j0 + k * stride;
    if (j < npacks) px[k] = xr[j];
  }
}

// The JSD per element (natural log) from the row's statistics: q, p, g = (1 - beta)(ls - lm), h = beta (lt - lm).
// log m from the larger of ls, lt (as csrc/jsd_with_logits.cpp): exactly ls for identical rows, never the log
// of an underflowing sum; NaN only where p = q = 0, where every use is masked.
template <typename T>
struct JSDElem {
  T q, p, g, h;
};

template <typename T>
__device__ __forceinline__ JSDElem<T> jsd_elem(T xv, T tv, const RowResult<T>& r, TargetType tt, T scale2, T beta) {
  const ElemProbs<T> v = elem_probs(xv, tv, r, tt, scale2);
  const T d = v.lt - v.ls, c = d > T(0) ? T(1) - beta : beta;
  const T lm = kmax(v.ls, v.lt) + klog1p(c * kexpm1(-(d < T(0) ? -d : d)));
  return {v.q, v.p, (T(1) - beta) * (v.ls - lm), beta * (v.lt - lm)};
}

// This thread's share of the row's JSD sums (loss, sum q g, sum p h) over packs j0 + k * stride.
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<double, 4> jsd_sums(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                                    int64_t j0, int64_t stride, int64_t npacks, const RowResult<T>& r,
                                                    const KLArgs<scalar_t, target_t>& a, T scale2) {
  T sq = T(0), sp = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (j0 + k * stride >= npacks) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const JSDElem<T> j = jsd_elem(to_acc(px[k].v[e]), to_acc(pt[k].v[e]), r, a.target, scale2, a.beta);
      sq += j.q > T(0) ? j.q * j.g : T(0);
      sp += j.p > T(0) ? j.p * j.h : T(0);
    }
  }
  return {{double(sq) + double(sp), double(sq), double(sp), 0.0}};
}

// The JSD's gradients for packs j0 + k * stride, times grad_scale; sq, sp: the row's sums.
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ void jsd_write_grads(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                                int64_t j0, int64_t stride, int64_t npacks, int64_t off,
                                                const RowResult<T>& r, const KLArgs<scalar_t, target_t>& a, T scale2,
                                                T gs, T sq, T sp) {
  const TargetType tt = a.target;
  const T gx_f = a.inv_t * gs, gt_f = tt == TargetType::Logits ? a.inv_t * gs : gs;
  store_grads<K, scalar_t, VEC>(j0, stride, npacks, off, a.gx, a.gt, [&](int k, int e, scalar_t& ox, target_t& ot) {
    const JSDElem<T> v = jsd_elem(to_acc(px[k].v[e]), to_acc(pt[k].v[e]), r, tt, scale2, a.beta);
    ox = static_cast<scalar_t>((v.q > T(0) ? v.q * (v.g - sq) : T(0)) * gx_f);
    T g;
    if (tt == TargetType::Logits) g = v.p > T(0) ? v.p * (v.h - sp) : T(0);
    else if (tt == TargetType::LogProbs) g = v.p > T(0) ? v.p * v.h : T(0);
    else g = v.p + v.q > T(0) ? v.h : T(0);  // probs: d/dp, -inf where p = 0 < q, as for the KL
    ot = static_cast<target_t>(g * gt_f);
  });
}

// Rows held in registers take their maxima first and every sum relative to them: nothing is rescaled, and
// the partial sums are merged in double. The sums of V exponentials then carry ~1e-9 relative error instead
// of the ~1e-7 that online rescaling of fp32 sums leaves, which is all of a tiny KL between near-identical
// rows (a student near convergence). Streamed rows keep the online statistics (one read).

// The maxima (base 2) of the held packs j0 + k * stride below npacks: raw compares, scaled once (scale2 > 0).
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<T, 2> held_max(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                               int64_t j0, int64_t stride, int64_t npacks, bool logits, T scale2) {
  Vals<T, 2> m{{-kinf<T>(), -kinf<T>()}};
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (j0 + k * stride >= npacks) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      m.v[0] = kmax(m.v[0], to_acc(px[k].v[e]));
      if (logits) m.v[1] = kmax(m.v[1], to_acc(pt[k].v[e]));
    }
  }
  m.v[0] = kmul(m.v[0], scale2);
  m.v[1] = kmul(m.v[1], scale2);
  return m;
}

// This thread's share of the row's sums (d_s, d_t, acc, s_p) relative to the row maxima m, to be summed in
// double. fold() never rescales here: its state starts at the row maxima.
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<double, 4> held_sums(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                                     int64_t j0, int64_t stride, int64_t npacks,
                                                     const KLArgs<scalar_t, target_t>& a, T scale2,
                                                     const Vals<T, 2>& m) {
  RowState<T> st{m.v[0], T(0), m.v[1], T(0), T(0), T(0)};
  fold<K>(st, px, pt, j0, stride, npacks, a, scale2);
  return {{st.d_s, st.d_t, st.acc, st.s_p}};
}

// The row's result from its maxima and its sums (in double). Only (d_s - d_t) / d_t needs the double sums: for
// near-identical rows d_s and d_t agree to their last fp32 bits, and that ratio is all of log2(d_s / d_t). The
// rest is fp32 math (double transcendentals are long serial chains on the GPU, paid once per row).
template <typename T>
__host__ __device__ __forceinline__ RowResult<T> finish_held(const Vals<T, 2>& m, const Vals<double, 4>& sums,
                                                             bool logits, bool fwd) {
  const RowState<T> st{m.v[0], T(sums.v[0]), m.v[1], T(sums.v[1]), T(sums.v[2]), T(sums.v[3])};
  const T rel = sums.v[1] > 0.0 ? T(sums.v[0] - sums.v[1]) / st.d_t : T(0);
  return finish(st, rel, logits, fwd);
}

// The row's sums reduced over the block (fixed order, in double) and finished once, by thread 0, into the
// RowResult every thread reads from shared memory. `out` and `red` are next written after the next row's maxima reduction, whose
// barriers (or, in a one-warp block, shuffles) every thread reaches only after reading `out`.
template <typename T>
__device__ __forceinline__ RowResult<T> block_finish(const Vals<T, 2>& m, Vals<double, 4> sums, Vals<double, 4>* red,
                                                     RowResult<T>* out, bool logits, bool fwd) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sums = SumOp()(sums, shfl_xor(sums, o));
  if (nwarps > 1) {
    if (lane == 0) red[warp] = sums;
    __syncthreads();
    if (warp == 0) {
      sums = lane < nwarps ? red[lane] : Vals<double, 4>{};
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sums = SumOp()(sums, shfl_xor(sums, o));
    }
  }
  if (threadIdx.x == 0) *out = finish_held(m, sums, logits, fwd);
  __syncthreads();
  return *out;
}

constexpr int kResidentThreads = 256;  // resident rows with up to 4 packs per thread
constexpr int kWideThreads = 512;      // resident rows with 8 packs per thread, split rows, streamed rows
constexpr int kWidePacks = 8;          // packs per thread, split rows
constexpr int kStreamPacks = 4;        // packs in flight per thread when streaming
constexpr int kMaxCluster = 8;         // the portable cluster size limit

// A masked row's gradients (nullptr: not wanted): 0.
template <typename scalar_t, int VEC, typename target_t>
__device__ __forceinline__ void zero_grads(scalar_t* gx, target_t* gt, int64_t off, int64_t npacks) {
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
  P zero;
  PT zero_t;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    zero.v[e] = scalar_t(0);
    zero_t.v[e] = target_t(0);
  }
  for (int64_t j = threadIdx.x; j < npacks; j += blockDim.x) {
    if (gx != nullptr) reinterpret_cast<P*>(gx + off)[j] = zero;
    if (gt != nullptr) reinterpret_cast<PT*>(gt + off)[j] = zero_t;
  }
}

// RESIDENT: the row (ITEMS packs per thread) stays in registers. Otherwise it is streamed ITEMS packs at a time.
// JSD: the row's statistics as for the KL, then one more pass for the JSD's loss and gradient sums (a template
// parameter, so the KL kernels carry none of its code or registers).
template <typename scalar_t, typename target_t, int VEC, int ITEMS, bool RESIDENT, bool JSD>
__global__ void __launch_bounds__(RESIDENT && ITEMS < 8 ? kResidentThreads : kWideThreads)
    kl_rows_kernel(const KLArgs<scalar_t, target_t> a) {
  using T = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
  __shared__ Vals<T, 2> red_max[32];
  __shared__ Vals<double, 4> red_sum[32];
  __shared__ RowResult<T> res;
  const bool logits = a.target == TargetType::Logits;
  const bool grads = a.gx != nullptr || a.gt != nullptr;
  const T scale2 = a.inv_t * T(kLog2e);
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  const int64_t npacks = a.V / VEC, stride = blockDim.x, tid = threadIdx.x;
  const Vals<T, 2> no_max{{-kinf<T>(), -kinf<T>()}};
  // Rows held with 8 packs per thread (KL_EXT_CUDA_LONG_ROWS=hold) have no vocab-parallel modes (launch_kl):
  // without their branches those kernels keep the row in registers (with them, 208 bytes spilled on sm_90).
  constexpr bool kVocabParallel = !(RESIDENT && ITEMS == kWidePacks);
  const auto live = [&](int64_t row) { return a.mask == nullptr || a.mask[row]; };
  P px[ITEMS];
  PT pt[ITEMS];
  // Packs j0 + k * stride of row `row` of both inputs into px, pt.
  const auto load = [&](int64_t row, int64_t j0) {
    load_packs<ITEMS>(px, pt, row_packs<VEC>(a.x, a.rx, row), row_packs<VEC>(a.t, a.rt, row), j0, stride, npacks);
  };
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const int64_t off = row * a.V;
    if (!live(row)) {
      if (tid == 0) a.loss[row] = T(0);
      zero_grads<scalar_t, VEC>(a.gx, a.gt, off, npacks);
    } else {
      RowResult<T> r;
      if (kVocabParallel && a.given != nullptr) {  // vocab-parallel finishing pass: the row statistics given
        if constexpr (RESIDENT) {
          load(row, tid);
        }
        r = given_result(a.given + 4 * row, logits);
      } else if constexpr (RESIDENT) {
        load(row, tid);
        const Vals<T, 2> m =
            block_allreduce(held_max<ITEMS>(px, pt, tid, stride, npacks, logits, scale2), red_max, no_max, MaxOp());
        r = block_finish(m, held_sums<ITEMS>(px, pt, tid, stride, npacks, a, scale2, m), red_sum, &res, logits,
                         a.forward);
      } else {
        RowState<T> st = empty_state<T>();
        for (int64_t j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
          load(row, j0);
          fold<ITEMS>(st, px, pt, j0, stride, npacks, a, scale2);
        }
        // Each thread's online statistics moved once to the row maxima, in double, then summed in double: fp32
        // rescaling at every level of a merge tree would leave ~1e-7 relative error in the sums.
        const Vals<T, 2> m = block_allreduce(Vals<T, 2>{{st.m_s, st.m_t}}, red_max, no_max, MaxOp());
        const RowState<double> w = rebase(RowState<double>{st.m_s, st.d_s, st.m_t, st.d_t, st.acc, st.s_p},
                                          double(m.v[0]), double(m.v[1]), logits, a.forward);
        r = block_finish(m, Vals<double, 4>{{w.d_s, w.d_t, w.acc, w.s_p}}, red_sum, &res, logits, a.forward);
      }
      if (kVocabParallel && a.shard != nullptr && a.given == nullptr) {  // vocab-parallel statistics pass
        if (tid == 0) put_shard_stats(a.shard + 3 * row, r, logits, JSD);
        continue;
      }
      T sq = T(0), sp = T(0);
      if constexpr (JSD) {
        Vals<double, 4> js{};
        if constexpr (RESIDENT) {
          js = jsd_sums<ITEMS>(px, pt, tid, stride, npacks, r, a, scale2);
        } else {
          for (int64_t j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
            load(row, j0);
            js = SumOp()(js, jsd_sums<ITEMS>(px, pt, j0, stride, npacks, r, a, scale2));
          }
        }
        js = block_allreduce(js, red_sum, Vals<double, 4>{}, SumOp());
        r.kl = T(js.v[0]);
        sq = T(js.v[1]);
        sp = T(js.v[2]);
        if (kVocabParallel && a.given != nullptr) {  // this shard's sums out; the gradients take the whole row's
          if (tid == 0) {
            a.shard[2 * row] = sq;
            a.shard[2 * row + 1] = sp;
          }
          sq = a.given[4 * row + 2];
          sp = a.given[4 * row + 3];
        }
      }
      if (tid == 0) a.loss[row] = r.kl;
      if (grads) {
        const auto grads_of = [&](int64_t j0) {
          if constexpr (JSD) {
            jsd_write_grads<ITEMS>(px, pt, j0, stride, npacks, off, r, a, scale2, gs, sq, sp);
          } else {
            write_grads<ITEMS>(px, pt, j0, stride, npacks, off, r, a, scale2, gs);
          }
        };
        if constexpr (RESIDENT) {
          grads_of(tid);
        } else {
          for (int64_t j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
            load(row, j0);
            grads_of(j0);
          }
        }
      }
    }
  }
}

// op over the cluster (every block passes its block-wide value): each block publishes its value in shared
// memory, and every block combines all of them in rank order (the same result everywhere).
template <typename V, typename Op>
__device__ __forceinline__ V cluster_allreduce(V v, V* mine, unsigned size, Op op) {
  if (threadIdx.x == 0) mine[0] = v;
  cluster_sync();
  v = *cluster_map(mine, 0);
  for (unsigned b = 1; b < size; ++b) v = op(v, *cluster_map(mine, b));
  cluster_sync();  // `mine` is written again by the next reduction
  return v;
}

// A row split over the blocks of a cluster: block `rank` holds packs [rank * slice, (rank + 1) * slice) in
// registers. Maxima, then sums, are reduced over each block and then over the cluster through distributed
// shared memory, in rank order (the same result in every block, deterministic). Launched only with clusters.
template <typename scalar_t, typename target_t, int VEC>
__global__ void __launch_bounds__(kWideThreads)
    kl_split_rows_kernel(const KLArgs<scalar_t, target_t> a, int64_t slice) {
  using T = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
  constexpr int ITEMS = kWidePacks;
  using Max2 = Vals<T, 2>;
  using Sums = Vals<double, 4>;
  KL_EXT_SHARED(Max2, red_max, 32);
  KL_EXT_SHARED(Sums, red_sum, 32);
  KL_EXT_SHARED(Max2, mine_max, 1);  // this block's maxima, read by the cluster
  KL_EXT_SHARED(Sums, mine_sum, 1);  // this block's sums, read by the cluster
  const bool logits = a.target == TargetType::Logits;
  const T scale2 = a.inv_t * T(kLog2e);
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  const unsigned rank = cluster_rank(), size = cluster_size();
  const int64_t npacks = a.V / VEC, stride = blockDim.x, tid = threadIdx.x;
  const int64_t lo = std::min<int64_t>(int64_t(rank) * slice, npacks);
  const int64_t count = std::min<int64_t>(slice, npacks - lo);
  for (int64_t row = blockIdx.x / size; row < a.N; row += gridDim.x / size) {
    const int64_t off = row * a.V + lo * VEC;  // this block's slice of the gradients
    if (a.mask != nullptr && !a.mask[row]) {   // the same for every block of the cluster
      if (rank == 0 && tid == 0) a.loss[row] = T(0);
      zero_grads<scalar_t, VEC>(a.gx, a.gt, off, count);
      continue;
    }
    const P* xr = row_packs<VEC>(a.x, a.rx, row) + lo;
    const PT* tr = row_packs<VEC>(a.t, a.rt, row) + lo;
    P px[ITEMS];
    PT pt[ITEMS];
    load_packs<ITEMS>(px, pt, xr, tr, tid, stride, count);
    Max2 m = block_allreduce(held_max<ITEMS>(px, pt, tid, stride, count, logits, scale2), red_max,
                             Max2{{-kinf<T>(), -kinf<T>()}}, MaxOp());
    m = cluster_allreduce(m, mine_max, size, MaxOp());
    Sums sums = block_allreduce(held_sums<ITEMS>(px, pt, tid, stride, count, a, scale2, m), red_sum, Sums{}, SumOp());
    sums = cluster_allreduce(sums, mine_sum, size, SumOp());
    const RowResult<T> r = finish_held(m, sums, logits, a.forward);
    if (rank == 0 && tid == 0) a.loss[row] = r.kl;
    write_grads<ITEMS>(px, pt, tid, stride, count, off, r, a, scale2, gs);
  }
}

// What the launcher needs to know of the device.
struct KLDevice {
  int sms;        // sizes grids: one wave of resident blocks, which then loop over rows
  bool clusters;  // thread-block clusters (sm_90+): long rows split over a cluster
};

struct KLConfig {
  int items, threads, cluster;  // cluster > 0: split rows over `cluster` blocks
  bool resident;
};
constexpr KLConfig kStreamConfig{kStreamPacks, kWideThreads, 0, false};

// Resident when the row fits a block of <= 256 threads with up to 4 packs each (several blocks per SM).
// Longer rows stream with 512 threads, 4 packs in flight each: one read for the forward, a second for the
// gradients. KL_EXT_CUDA_LONG_ROWS=hold instead holds them in registers when gradients are wanted: 8 packs per
// thread in one 512-thread block (one per SM), or, with clusters (sm_90), split over 2 - 8 blocks. That reads
// once, but on an H100 (2026-11-23, benchmarks/cuda_paths.py) it ran 1.1 - 3.9x slower than streaming: one
// row per SM leaves its loads, reductions and stores unoverlapped. Read at each launch, so a benchmark can
// compare the two.
inline KLConfig kl_config(int64_t npacks, bool grads, bool clusters, bool hold_long) {
  for (int items : {1, 2, 4}) {
    const int64_t threads = round_up(std::max<int64_t>(ceil_div(npacks, items), 1), 32);
    if (threads <= kResidentThreads) return {items, int(threads), 0, true};
  }
  if (grads && hold_long) {
    if (npacks <= int64_t(kWidePacks) * kWideThreads) {
      return {kWidePacks, round_up(ceil_div(npacks, kWidePacks), 32), 0, true};
    }
    if (clusters) {
      for (int size = 2; size <= kMaxCluster; size *= 2) {
        const int64_t threads = round_up(ceil_div(ceil_div(npacks, size), kWidePacks), 32);
        if (threads <= kWideThreads) return {kWidePacks, int(threads), size, true};
      }
    }
  }
  return kStreamConfig;
}

inline bool hold_long_rows() {
  const char* v = std::getenv("KL_EXT_CUDA_LONG_ROWS");
  return v != nullptr && std::string(v) == "hold";
}

// Which kernels are built for a dtype pair (each one multiplies the build): float64 (tests and gradcheck:
// correctness, not speed) streams every row; the opt-in held long rows (8 packs per thread, clusters) are built
// for the KL of one 32/16-bit dtype only. Mixed pairs get the default paths: resident and streamed rows.
template <typename scalar_t>
constexpr bool kHeldRows = !std::is_same_v<scalar_t, double>;
template <typename scalar_t, typename target_t, bool JSD>
constexpr bool kHeldLongRows = !JSD && kHeldRows<scalar_t> && std::is_same_v<scalar_t, target_t>;

// launch(items, resident) with the configuration's packs per thread and residency as compile-time constants
// (std::integral_constant / std::bool_constant): the row kernels' template arguments. HELD: whether held rows
// can occur; HELD8: whether held rows of 8 packs per thread can (kl_config with hold_long).
template <bool HELD, bool HELD8, typename F>
void with_row_kernel(const KLConfig& c, const F& launch) {
  if constexpr (HELD) {
    if (c.resident) {
      if (c.items == 1) {
        launch(std::integral_constant<int, 1>{}, std::true_type{});
      } else if (c.items == 2) {
        launch(std::integral_constant<int, 2>{}, std::true_type{});
      } else if (c.items == 4) {
        launch(std::integral_constant<int, 4>{}, std::true_type{});
      } else if constexpr (HELD8) {
        launch(std::integral_constant<int, kWidePacks>{}, std::true_type{});
      }
      return;
    }
  }
  launch(std::integral_constant<int, kStreamPacks>{}, std::false_type{});
}

template <typename scalar_t, typename target_t, int VEC, bool JSD>
void launch_rows(const KLArgs<scalar_t, target_t>& a, const KLConfig& c, dim3 grid, dim3 block,
                 cudaStream_t stream) {
  with_row_kernel<kHeldRows<scalar_t>, kHeldLongRows<scalar_t, target_t, JSD>>(c, [&](auto items,
                                                                                                auto resident) {
    auto kernel = kl_rows_kernel<scalar_t, target_t, VEC, decltype(items)::value, decltype(resident)::value, JSD>;
    KL_EXT_LAUNCH(kernel, grid, block, stream, a);
  });
}

template <typename scalar_t, typename target_t, int VEC, bool JSD>
void launch_kl(const KLArgs<scalar_t, target_t>& a, const KLDevice& dev, cudaStream_t stream) {
  const int64_t npacks = a.V / VEC;
  constexpr bool held_long = kHeldLongRows<scalar_t, target_t, JSD>;
  // Split rows (clusters) have no vocab-parallel modes: those stream.
  const KLConfig c = kHeldRows<scalar_t>
                         ? kl_config(npacks, a.gx != nullptr || a.gt != nullptr, dev.clusters,
                                     held_long && a.shard == nullptr && hold_long_rows())
                         : kStreamConfig;
  const int64_t wave = int64_t(dev.sms) * (c.resident && c.items < 8 ? 4 : 1);
  const dim3 block(c.threads);
  if constexpr (held_long) {
    if (c.cluster > 0) {
      // One row per cluster and wave; a cluster's blocks need a whole SM each (<= 128 registers x 512 threads).
      const int64_t clusters = std::max<int64_t>(1, std::min<int64_t>(a.N, dev.sms / c.cluster));
      auto kernel = kl_split_rows_kernel<scalar_t, target_t, VEC>;
      KL_EXT_LAUNCH_CLUSTER(kernel, dim3(unsigned(clusters * c.cluster)), block, c.cluster, stream, a,
                            ceil_div(npacks, c.cluster));
      return;
    }
  }
  launch_rows<scalar_t, target_t, VEC, JSD>(a, c, dim3(unsigned(std::min<int64_t>(a.N, wave))), block, stream);
}

// Both ops on device tensors of one dtype pair, after their checks (call); beta > 0 selects the JSD. A template
// of its own, so that the CUDA build compiles each pair in its own translation unit (softmax_rows_pairs.h).
template <typename scalar_t, typename target_t>
void softmax_rows_typed(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                        const c10::optional<at::Tensor>& mask, double temperature, double beta,
                        const c10::optional<at::Tensor>& grad_scale, const KLDevice& dev, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = num_rows(input), V = input.size(-1);
  const KLArgs<scalar_t, target_t> a{input.const_data_ptr<scalar_t>(),
                                     target.const_data_ptr<target_t>(),
                                     row_layout(input),
                                     row_layout(target),
                                     mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
                                     call.loss.mutable_data_ptr<acc_t>(),
                                     call.gx.numel() > 0 ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
                                     call.gt.numel() > 0 ? call.gt.mutable_data_ptr<target_t>() : nullptr,
                                     grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr,
                                     N,
                                     V,
                                     acc_t(1.0 / temperature),
                                     call.target_type,
                                     call.direction == Direction::Forward,
                                     acc_t(beta),
                                     call.shard.defined() ? call.shard.mutable_data_ptr<acc_t>() : nullptr,
                                     call.given.defined() ? call.given.const_data_ptr<acc_t>() : nullptr};
  constexpr int VEC = pair_vec<scalar_t, target_t>();
  const bool packs = V % VEC == 0 && packs_aligned<VEC>(a.x, a.gx) && packs_aligned<VEC>(a.t, a.gt) &&
                     a.rx.steps_of(VEC) && a.rt.steps_of(VEC);
  if (beta > 0) {
    packs ? launch_kl<scalar_t, target_t, VEC, true>(a, dev, stream)
          : launch_kl<scalar_t, target_t, 1, true>(a, dev, stream);
  } else {
    packs ? launch_kl<scalar_t, target_t, VEC, false>(a, dev, stream)
          : launch_kl<scalar_t, target_t, 1, false>(a, dev, stream);
  }
}

// Both ops on device tensors, input and target each read in its own dtype (the pairs of dispatch_pair).
inline void softmax_rows_cuda(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                              const c10::optional<at::Tensor>& mask, double temperature, double beta,
                              const c10::optional<at::Tensor>& grad_scale, const KLDevice& dev, cudaStream_t stream) {
  if (num_rows(input) == 0) return;
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto x_tag, auto t_tag) {
    softmax_rows_typed<decltype(x_tag), decltype(t_tag)>(call, input, target, mask, temperature, beta, grad_scale,
                                                         dev, stream);
  });
}

}  // namespace cuda
}  // namespace kl_ext
