// kl_div_with_logits_fwd and divergence_with_logits_fwd: the CUDA kernels and their host entries (contracts:
// csrc/kl_div_with_logits.cpp, csrc/divergences.cpp). Included by csrc/cuda/kl_div_with_logits.cu, and by
// tests/cuda_emu, which runs the same code on the CPU. Each loss is a policy (KLLoss, DivergenceLoss: its per-element
// terms and gradients) over one row machinery (statistics, reductions, launch paths): a new loss over two
// softmax rows is a policy and a registration, not a kernel.
//
// One row engine (kl_held_kernel): every row of a 16/32-bit dtype pair in 16-byte packs is held in registers,
// so it is read once and the loss and both gradients come from that read (fwd+bwd = read student + read
// teacher + write gradient: the floor; a forward reads each input once):
//  * one block per row, 1, 2, 4 or 8 packs per thread, up to 256 threads (8 x 256 packs: 16384 16-bit or
//    8192 fp32 values per row);
//  * on sm_90, longer rows split over a thread-block cluster of 2 - 8 blocks of up to 256 threads, at 8 blocks
//    of up to 512 (262144 16-bit values), which merge their statistics through distributed shared memory;
//  * the rest (float64, rows not in 16-byte packs, longer rows, GPUs without clusters beyond 512 x 8 packs) is
//    streamed (kl_stream_kernel): one pass with online statistics, a second for the gradients.
// The limits are KL_EXT_CUDA_ROWS (RowTune), so one build can sweep them on a GPU.
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
  Divergence divergence;  // DivergenceLoss: which, and its param (JSD beta, skew alpha)
  acc_t param;
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
  template <typename T, int N>
  __host__ __device__ __forceinline__ Vals<T, N> identity(const Vals<T, N>&) const {
    Vals<T, N> r;
    for (int i = 0; i < N; ++i) r.v[i] = -kinf<T>();
    return r;
  }
};
struct SumOp {
  template <typename T, int N>
  __host__ __device__ __forceinline__ Vals<T, N> operator()(Vals<T, N> a, const Vals<T, N>& b) const {
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
  template <typename T, int N>
  __host__ __device__ __forceinline__ Vals<T, N> identity(const Vals<T, N>&) const {
    return Vals<T, N>{};
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

// One element's terms of its row's sums s, relative to the shifts sh_s, sh_t (base 2): s[0] += e_s; teacher logits:
// s[1] += e_t and s[2] += e_s - e_t (d_s - d_t as a sum of small, exact-ish differences), other targets s[4] += p;
// s[3], the KL accumulator, += p (lt - zs) (forward) or e_s (zs - lt) (reverse). Terms of zero weight are 0
// (0 log 0 = 0), never 0 * inf.
template <typename T>
__device__ __forceinline__ void add_terms(Vals<T, 5>& s, T xv, T tv, T sh_s, T sh_t, TargetType tt, bool fwd,
                                          T scale2) {
  const T zs = kmul(xv, scale2) - sh_s, es = kexp2(zs);
  T p = T(0);
  T lt = teacher_log2(tv, tt, scale2, p);
  if (tt == TargetType::Logits) {
    lt -= sh_t;
    p = kexp2(lt);
    s.v[1] += p;
    s.v[2] += es - p;
  } else {
    s.v[4] += p;
  }
  s.v[0] += es;
  s.v[3] += fwd ? (p > T(0) ? p * (lt - zs) : T(0)) : (es > T(0) ? es * (zs - lt) : T(0));
}

// Fold packs j0 + k * stride (k < K, below npacks) into this thread's statistics, one pack at a time: the
// pack's maxima, a rebase when they moved (rare after the first packs), then one exp2 per element and side.
// Pack by pack keeps few converted values live (a whole-chunk max first made the compiler keep all of them).
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ void fold(RowState<T>& st, const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                     int j0, int stride, int npacks,
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
    Vals<T, 5> sums{{st.d_s, st.d_t, T(0), st.acc, st.s_p}};  // [2] (held rows' d_s - d_t) unused: dead code
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      add_terms(sums, to_acc(px[k].v[e]), to_acc(pt[k].v[e]), sh_s, sh_t, a.target, fwd, scale2);
    }
    st.d_s = sums.v[0];
    st.d_t = sums.v[1];
    st.acc = sums.v[3];
    st.s_p = sums.v[4];
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

// Vocab-parallel statistics pass (csrc/common.h): the row's loss on this shard alone (0 for a divergence) and the
// natural log-masses of student and teacher (-inf where none).
template <typename T>
__host__ __device__ __forceinline__ void put_shard_stats(T* o, const RowResult<T>& r, bool logits, bool sums) {
  const T ln2 = T(kLn2), inf = kinf<T>();
  o[0] = sums ? T(0) : r.kl;
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
__device__ __forceinline__ void store_grads(int j0, int stride, int npacks, int64_t off, scalar_t* gx,
                                            target_t* gt, const F& elem) {
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = j0 + k * stride;
    if (j >= npacks) continue;
    P ox;
    PT ot;
#pragma unroll
    for (int e = 0; e < VEC; ++e) elem(k, e, ox.v[e], ot.v[e]);
    if (gx != nullptr) reinterpret_cast<P*>(gx + off)[j] = ox;
    if (gt != nullptr) reinterpret_cast<PT*>(gt + off)[j] = ot;
  }
}

template <int K, typename scalar_t, int VEC, typename target_t>
__device__ __forceinline__ void load_packs(Pack<scalar_t, VEC>* px, Pack<target_t, VEC>* pt,
                                           const Pack<scalar_t, VEC>* xr, const Pack<target_t, VEC>* tr, int j0,
                                           int stride, int npacks) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = j0 + k * stride;
    if (j < npacks) {
      px[k] = xr[j];
      pt[k] = tr[j];
    }
  }
}

// The same for a row of one operand.
template <int K, typename scalar_t, int VEC>
__device__ __forceinline__ void load_packs(Pack<scalar_t, VEC>* px, const Pack<scalar_t, VEC>* xr, int j0,
                                           int stride, int npacks) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = j0 + k * stride;
    if (j < npacks) px[k] = xr[j];
  }
}

// The row engine's losses, as policies: what a loss over two softmax rows adds to the row statistics
// (RowResult: maxima, log-sum-exps, masses, and the KL, which every loss's statistics pass computes anyway).
//   kSums        how many per-row sums of per-element terms the loss needs beyond the statistics (0: none; else
//                one more reduction over the row, which a held row does from registers)
//   terms(e, a)  an element's contributions to those sums; v[0] is the loss's
//   loss(r, s)   the row's loss from its statistics and sums
//   grad(e, r, s, a, gx, gt)  an element's gradients with respect to the scaled logits x / T (and t / T for
//                teacher logits; the teacher as given otherwise), before grad_scale and 1 / T; gt only where
//                a.gt is wanted
// e: the element's student and teacher log-probs and probs (elem_probs). Terms of zero weight are 0, never
// 0 * inf (0 log 0 = 0).
struct KLLoss {
  static constexpr int kSums = 0;
  template <typename T, typename A>
  __device__ static Vals<T, 3> terms(const ElemProbs<T>&, const A&) {
    return {};
  }
  template <typename T>
  __device__ static T loss(const RowResult<T>& r, const Vals<T, 3>&) {
    return r.kl;
  }
  template <typename T, typename A>
  __device__ static void grad(const ElemProbs<T>& v, const RowResult<T>& r, const Vals<T, 3>&, const A& a, T& gx,
                              T& gt) {
    const T ls = v.ls, q = v.q, lt = v.lt, p = v.p;
    if (a.forward) {
      gx = q * r.mass_t - p;
      if (a.gt == nullptr) return;
      if (a.target == TargetType::Logits) gt = p > T(0) ? p * ((lt - ls) - r.kl) : T(0);
      else if (a.target == TargetType::LogProbs) gt = p > T(0) ? p * (lt - ls + T(1)) : T(0);
      else gt = lt - ls + T(1);  // -inf at p = 0, as the math says
    } else {
      gx = q > T(0) ? q * ((ls - lt) - r.kl) : T(0);
      if (a.gt == nullptr) return;
      if (a.target == TargetType::Logits) gt = p * r.mass_s - q;
      else if (a.target == TargetType::LogProbs) gt = -q;
      else gt = q > T(0) ? -q / p : T(0);
    }
  }
};

// The divergences of divergence_with_logits_fwd (csrc/divergences.h: each one's per-element term f and
// derivatives gq = dL/dq, gp = dL/dp, over ScalarMath here). Sums: the loss, sum q gq, sum p gp. Which divergence
// is a runtime switch (uniform over the grid), not a template: one set of kernels serves them all, so a new
// divergence costs no CUDA build time.
template <typename Acc>
struct ScalarMath {
  using S = Acc;
  using T = Acc;
  __host__ __device__ static T c(S x) { return x; }
  __host__ __device__ static T select_pos(T d, T a, T b) { return d > T(0) ? a : b; }
  template <typename FA, typename FB>
  __host__ __device__ static T lazy_select_pos(T d, const FA& fa, const FB& fb) {
    return d > T(0) ? fa() : fb();
  }
  __host__ __device__ static T abs(T x) { return x < T(0) ? -x : x; }
  __host__ __device__ static T exp(T x) { return kexp(x); }
  __host__ __device__ static T log(T x) { return klog(x); }
  __host__ __device__ static T max(T a, T b) { return kmax(a, b); }
  __host__ __device__ static T log1p(T x) { return klog1p(x); }
  __host__ __device__ static T expm1(T x) { return kexpm1(x); }
};

// Applies a divergence's terms to one element (with_divergence's functor: no device lambda in a host-device
// function).
template <typename T>
struct ElemTerms {
  const ElemProbs<T>& v;
  template <typename Terms>
  __host__ __device__ DivTerms<T> operator()(const Terms& terms) const {
    return terms(v.ls, v.lt, v.q, v.p);
  }
};

struct DivergenceLoss {
  static constexpr int kSums = 3;
  template <typename T, typename A>
  __device__ static DivTerms<T> elem(const ElemProbs<T>& v, const A& a) {
    return with_divergence<ScalarMath<T>>(a.divergence, T(a.param), ElemTerms<T>{v});
  }
  template <typename T, typename A>
  __device__ static Vals<T, 3> terms(const ElemProbs<T>& v, const A& a) {
    const DivTerms<T> e = elem(v, a);
    return {{e.f, v.q > T(0) ? v.q * e.gq : T(0), v.p > T(0) ? v.p * e.gp : T(0)}};
  }
  template <typename T>
  __device__ static T loss(const RowResult<T>&, const Vals<T, 3>& s) {
    return s.v[0];
  }
  template <typename T, typename A>
  __device__ static void grad(const ElemProbs<T>& v, const RowResult<T>&, const Vals<T, 3>& s, const A& a, T& gx,
                              T& gt) {
    const DivTerms<T> e = elem(v, a);
    gx = v.q > T(0) ? v.q * (e.gq - s.v[1]) : T(0);
    if (a.gt == nullptr) return;
    if (a.target == TargetType::Logits) gt = v.p > T(0) ? v.p * (e.gp - s.v[2]) : T(0);
    else if (a.target == TargetType::LogProbs) gt = v.p > T(0) ? v.p * e.gp : T(0);
    else gt = v.p + v.q > T(0) ? e.gp : T(0);  // probs: d/dp, -inf where the math says (p = 0 < q, a KL side)
  }
};

// This thread's share of the loss's row sums over packs j0 + k * stride.
template <typename Loss, int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<T, 3> loss_sums(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                                int j0, int stride, int npacks, const RowResult<T>& r,
                                                const KLArgs<scalar_t, target_t>& a, T scale2) {
  Vals<T, 3> s{};
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (j0 + k * stride >= npacks) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      s = SumOp()(s, Loss::terms(elem_probs(to_acc(px[k].v[e]), to_acc(pt[k].v[e]), r, a.target, scale2), a));
    }
  }
  return s;
}

// The loss's gradients for packs j0 + k * stride, times grad_scale (and 1 / T where they are of logits).
template <typename Loss, int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ void write_grads(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                            int j0, int stride, int npacks, int64_t off,
                                            const RowResult<T>& r, const Vals<T, 3>& sums,
                                            const KLArgs<scalar_t, target_t>& a, T scale2, T gs) {
  const T gx_f = a.inv_t * gs, gt_f = a.target == TargetType::Logits ? a.inv_t * gs : gs;
  store_grads<K, scalar_t, VEC>(j0, stride, npacks, off, a.gx, a.gt, [&](int k, int e, scalar_t& ox, target_t& ot) {
    T gx = T(0), gt = T(0);
    Loss::grad(elem_probs(to_acc(px[k].v[e]), to_acc(pt[k].v[e]), r, a.target, scale2), r, sums, a, gx, gt);
    if (a.gx != nullptr) ox = static_cast<scalar_t>(gx * gx_f);
    if (a.gt != nullptr) ot = static_cast<target_t>(gt * gt_f);
  });
}

// Held rows (registers) take their maxima first and every sum relative to them: nothing is rescaled. The sums
// are fp32; d_s - d_t, which is all of log2(d_s / d_t) for near-identical rows (a student near convergence),
// comes from sum (e_s - e_t), whose terms are small and exact-ish, not from the difference of two sums that
// agree to their last bits (that left ~20% error in a 5e-7 KL; double sums cost registers).

// The maxima (base 2) of the held packs j0 + k * stride below npacks: raw compares, scaled once (scale2 > 0).
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<T, 2> held_max(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                               int j0, int stride, int npacks, bool logits, T scale2) {
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

// This thread's share of the row's sums (add_terms) relative to the row maxima m (base 2): fold()'s terms without
// its rescaling, which the maxima make unnecessary.
template <int K, typename scalar_t, int VEC, typename target_t, typename T>
__device__ __forceinline__ Vals<T, 5> held_sums(const Pack<scalar_t, VEC>* px, const Pack<target_t, VEC>* pt,
                                                int j0, int stride, int npacks, const KLArgs<scalar_t, target_t>& a,
                                                T scale2, const Vals<T, 2>& m) {
  const T sh_s = safe_shift(m.v[0]), sh_t = safe_shift(m.v[1]);
  Vals<T, 5> s{};
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (j0 + k * stride >= npacks) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      add_terms(s, to_acc(px[k].v[e]), to_acc(pt[k].v[e]), sh_s, sh_t, a.target, a.forward, scale2);
    }
  }
  return s;
}

// The row's result from its maxima and its sums (d_s, d_t, d_s - d_t, acc, s_p) in S: float for held rows,
// double for streamed ones.
template <typename T, typename S>
__host__ __device__ __forceinline__ RowResult<T> finish_sums(const Vals<T, 2>& m, const Vals<S, 5>& sums, bool logits,
                                                             bool fwd) {
  const RowState<T> st{m.v[0], T(sums.v[0]), m.v[1], T(sums.v[1]), T(sums.v[3]), T(sums.v[4])};
  const T rel = sums.v[1] > S(0) ? T(sums.v[2] / sums.v[1]) : T(0);
  return finish(st, rel, logits, fwd);
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

constexpr int kWideThreads = 512;      // the widest held block; streamed rows
constexpr int kHeldPacks = 8;          // packs per thread of a held row, at most
constexpr int kStreamPacks = 4;        // packs in flight per thread when streaming

// A masked row's gradients (nullptr: not wanted): 0.
template <typename scalar_t, int VEC, typename target_t>
__device__ __forceinline__ void zero_grads(scalar_t* gx, target_t* gt, int64_t off, int npacks) {
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
  P zero;
  PT zero_t;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    zero.v[e] = scalar_t(0);
    zero_t.v[e] = target_t(0);
  }
  for (int j = threadIdx.x; j < npacks; j += blockDim.x) {
    if (gx != nullptr) reinterpret_cast<P*>(gx + off)[j] = zero;
    if (gt != nullptr) reinterpret_cast<PT*>(gt + off)[j] = zero_t;
  }
}

// A held kernel's block within its row: its rank in the cluster, its slice [lo, lo + count) of the row's packs,
// and the reductions over the row of maxima M and sums S (the block's threads, then the cluster's blocks through
// distributed shared memory), with their shared memory. Shared by the engine's held kernels.
template <typename M, typename S>
struct HeldBlock {
  int cluster;
  unsigned rank;
  int lo, count;
  M *red_max, *mine_max;  // mine_*: this block's value, read by the cluster
  S *red_sum, *mine_sum;

  __device__ __forceinline__ static HeldBlock make(int cluster, int slice, int npacks) {
    KL_EXT_SHARED(M, red_max, 32);
    KL_EXT_SHARED(S, red_sum, 32);
    KL_EXT_SHARED(M, mine_max, 1);
    KL_EXT_SHARED(S, mine_sum, 1);
    const unsigned rank = cluster > 1 ? cluster_rank() : 0u;
    const int lo = std::min(int(rank) * slice, npacks);
    return {cluster, rank, lo, std::min(slice, npacks - lo), red_max, mine_max, red_sum, mine_sum};
  }
  template <typename V, typename Op>
  __device__ __forceinline__ V reduce(V v, V* red, V* mine, Op op) const {
    v = block_allreduce(v, red, op.identity(v), op);
    return cluster > 1 ? cluster_allreduce(v, mine, unsigned(cluster), op) : v;
  }
  __device__ __forceinline__ M max(const M& v) const { return reduce(v, red_max, mine_max, MaxOp()); }
  __device__ __forceinline__ S sum(const S& v) const { return reduce(v, red_sum, mine_sum, SumOp()); }
};

// The row engine: a row held in registers, ITEMS packs per thread, by one block or (sm_90) split over a cluster
// of `cluster` blocks, block `rank` holding packs [rank * slice, (rank + 1) * slice). Each input is read once
// and each gradient written once: the floor. Not persistent: a grid of one block (cluster) per row lets every
// SM keep as many rows in flight as its registers allow, and the scheduler overlaps one row's loads with
// another's reductions and stores (a grid-stride loop kept one row per block in flight); blocks loop over rows
// only beyond the grid limit (KLDevice::max_blocks). Maxima, then sums, are reduced over the block, then over
// the cluster through distributed shared memory, in a fixed order: the same result in every block, and
// deterministic. A loss with row sums of its own (Loss::kSums, the divergences) takes one more reduction over the held row.
// Registers per thread (launch bounds): 1 pack per thread, 64 (4 blocks of 256 threads per SM); more, up to 128
// (2 blocks of 256, or one of 512). Per held pack that is 64, ~50, ~30 and 16 registers at 1, 2, 4 and 8 packs
// per thread (ptxas, sm_90): many packs per thread keep the most rows in flight per SM (kl_config).
template <int ITEMS>
constexpr int kHeldMaxThreads = ITEMS < kHeldPacks ? 256 : kWideThreads;
template <int ITEMS>
constexpr int kHeldMinBlocks = ITEMS == 1 ? 4 : ITEMS < kHeldPacks ? 2 : 1;

template <typename scalar_t, typename target_t, int VEC, int ITEMS, typename Loss>
__global__ void __launch_bounds__(kHeldMaxThreads<ITEMS>, kHeldMinBlocks<ITEMS>)
    kl_held_kernel(const KLArgs<scalar_t, target_t> a, int cluster, int slice) {
  using T = at::opmath_type<scalar_t>;
  using Max2 = Vals<T, 2>;
  using Sums = Vals<T, 5>;
  // The vocab-parallel modes (launched with one block per row and up to 4 packs per thread): their branches
  // cost the 8-pack kernels registers.
  constexpr bool kVocabParallel = ITEMS < kHeldPacks;
  const bool logits = a.target == TargetType::Logits;
  const bool grads = a.gx != nullptr || a.gt != nullptr;
  const T scale2 = a.inv_t * T(kLog2e);
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  // Within a row, pack indices are 32-bit (V < 2^31, softmax_rows_typed); row offsets 64-bit.
  const int stride = blockDim.x, tid = threadIdx.x;
  const auto blk = HeldBlock<Max2, Sums>::make(cluster, slice, int(a.V / VEC));
  const int lo = blk.lo, count = blk.count;
  const bool lead = blk.rank == 0 && tid == 0;  // writes the row's loss
  for (int64_t row = blockIdx.x / cluster; row < a.N; row += gridDim.x / cluster) {
    const int64_t off = row * a.V + lo * VEC;  // this block's slice of the gradients
    if (a.mask != nullptr && !a.mask[row]) {   // the same in every block of the cluster
      if (lead) a.loss[row] = T(0);
      zero_grads<scalar_t, VEC>(a.gx, a.gt, off, count);
      continue;
    }
    Pack<scalar_t, VEC> px[ITEMS];
    Pack<target_t, VEC> pt[ITEMS];
    load_packs<ITEMS>(px, pt, row_packs<VEC>(a.x, a.rx, row) + lo, row_packs<VEC>(a.t, a.rt, row) + lo, tid, stride,
                      count);
    RowResult<T> r;
    if (kVocabParallel && a.given != nullptr) {  // vocab-parallel finishing pass: the row statistics given
      r = given_result(a.given + 4 * row, logits);
    } else {
      const Max2 m = blk.max(held_max<ITEMS>(px, pt, tid, stride, count, logits, scale2));
      r = finish_sums(m, blk.sum(held_sums<ITEMS>(px, pt, tid, stride, count, a, scale2, m)), logits, a.forward);
      if (kVocabParallel && a.shard != nullptr) {  // vocab-parallel statistics pass
        if (tid == 0) put_shard_stats(a.shard + 3 * row, r, logits, Loss::kSums > 0);
        continue;
      }
    }
    Vals<T, 3> sums{};
    if constexpr (Loss::kSums > 0) {
      const Vals<T, 3> mine = loss_sums<Loss, ITEMS>(px, pt, tid, stride, count, r, a, scale2);
      const Sums all = blk.sum(Sums{{mine.v[0], mine.v[1], mine.v[2], T(0), T(0)}});
      sums = {{all.v[0], all.v[1], all.v[2]}};
      r.kl = Loss::loss(r, sums);
      if (kVocabParallel && a.given != nullptr) {  // this shard's sums out; the gradients take the whole row's
        if (tid == 0) {
          a.shard[2 * row] = sums.v[1];
          a.shard[2 * row + 1] = sums.v[2];
        }
        sums.v[1] = a.given[4 * row + 2];
        sums.v[2] = a.given[4 * row + 3];
      }
    }
    if (lead) a.loss[row] = r.kl;
    if (grads) write_grads<Loss, ITEMS>(px, pt, tid, stride, count, off, r, sums, a, scale2, gs);
  }
}

// Rows that are not held (float64, rows not in 16-byte packs, rows longer than a block without clusters or than
// the widest cluster): streamed by one block, kStreamPacks packs per thread at a time, a wave of blocks looping
// over rows. One read with online statistics per thread (moved to the row maxima once, in double, and summed in
// double: fp32 rescaling at every level of a merge tree would leave ~1e-7 relative error in the sums); with
// gradients a second read (a loss with row sums of its own: a third), mostly from L2 while few rows are in flight.
template <typename scalar_t, typename target_t, int VEC, typename Loss>
__global__ void __launch_bounds__(kWideThreads) kl_stream_kernel(const KLArgs<scalar_t, target_t> a) {
  using T = at::opmath_type<scalar_t>;
  using Max2 = Vals<T, 2>;
  using Sums = Vals<double, 5>;
  constexpr int ITEMS = kStreamPacks;
  __shared__ Max2 red_max[32];
  __shared__ Sums red_sum[32];
  const bool logits = a.target == TargetType::Logits;
  const bool grads = a.gx != nullptr || a.gt != nullptr;
  const T scale2 = a.inv_t * T(kLog2e);
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  const int npacks = int(a.V / VEC), stride = blockDim.x, tid = threadIdx.x;
  Pack<scalar_t, VEC> px[ITEMS];
  Pack<target_t, VEC> pt[ITEMS];
  // Packs j0 + k * stride of row `row` of both inputs into px, pt.
  const auto load = [&](int64_t row, int j0) {
    load_packs<ITEMS>(px, pt, row_packs<VEC>(a.x, a.rx, row), row_packs<VEC>(a.t, a.rt, row), j0, stride, npacks);
  };
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const int64_t off = row * a.V;
    if (a.mask != nullptr && !a.mask[row]) {
      if (tid == 0) a.loss[row] = T(0);
      zero_grads<scalar_t, VEC>(a.gx, a.gt, off, npacks);
      continue;
    }
    RowResult<T> r;
    if (a.given != nullptr) {  // vocab-parallel finishing pass: the row statistics given
      r = given_result(a.given + 4 * row, logits);
    } else {
      RowState<T> st = empty_state<T>();
      for (int j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
        load(row, j0);
        fold<ITEMS>(st, px, pt, j0, stride, npacks, a, scale2);
      }
      const Max2 m = block_allreduce(Max2{{st.m_s, st.m_t}}, red_max, MaxOp().identity(Max2{}), MaxOp());
      const RowState<double> w =
          rebase(RowState<double>{st.m_s, st.d_s, st.m_t, st.d_t, st.acc, st.s_p}, double(m.v[0]), double(m.v[1]),
                 logits, a.forward);
      r = finish_sums(m, block_allreduce(Sums{{w.d_s, w.d_t, w.d_s - w.d_t, w.acc, w.s_p}}, red_sum, Sums{}, SumOp()),
                      logits, a.forward);
      if (a.shard != nullptr) {  // vocab-parallel statistics pass
        if (tid == 0) put_shard_stats(a.shard + 3 * row, r, logits, Loss::kSums > 0);
        continue;
      }
    }
    Vals<T, 3> sums{};
    if constexpr (Loss::kSums > 0) {
      Sums all{};
      for (int j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
        load(row, j0);
        const Vals<T, 3> mine = loss_sums<Loss, ITEMS>(px, pt, j0, stride, npacks, r, a, scale2);
        for (int i = 0; i < 3; ++i) all.v[i] += double(mine.v[i]);
      }
      all = block_allreduce(all, red_sum, Sums{}, SumOp());
      sums = {{T(all.v[0]), T(all.v[1]), T(all.v[2])}};
      r.kl = Loss::loss(r, sums);
      if (a.given != nullptr) {  // this shard's sums out; the gradients take the whole row's
        if (tid == 0) {
          a.shard[2 * row] = sums.v[1];
          a.shard[2 * row + 1] = sums.v[2];
        }
        sums.v[1] = a.given[4 * row + 2];
        sums.v[2] = a.given[4 * row + 3];
      }
    }
    if (tid == 0) a.loss[row] = r.kl;
    if (grads) {
      for (int j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
        load(row, j0);
        write_grads<Loss, ITEMS>(px, pt, j0, stride, npacks, off, r, sums, a, scale2, gs);
      }
    }
  }
}

// What the launcher needs to know of the device.
struct KLDevice {
  int sms;                         // sizes the streamed rows' grid: waves of blocks, which loop over rows
  bool clusters;                   // thread-block clusters (sm_90+): long rows split over a cluster
  int64_t max_blocks = INT32_MAX;  // the grid's limit: beyond it, held blocks loop over rows
};

// The engine's shape limits, from KL_EXT_CUDA_ROWS="min_threads=128,threads=256,items=8,cluster=8,stream_waves=1"
// (any subset; read at each launch, so that one build sweeps them: benchmarks/cuda_paths.py). Unset: these.
struct RowTune {
  int min_threads = 128;   // fewer packs per thread rather than a block of fewer threads (the reductions' width)
  int threads = 256;       // threads of a held block (8 packs per thread: up to kWideThreads at the largest cluster)
  int items = kHeldPacks;  // packs per thread of a held row, at most
  int cluster = 8;         // blocks per cluster, at most (8 is portable; 16 is opted into, sm_90)
  int stream_waves = 1;    // streamed rows: blocks per SM
};

inline RowTune row_tune() {
  RowTune t;
  const char* env = std::getenv("KL_EXT_CUDA_ROWS");
  if (env == nullptr) return t;
  const std::string s(env);
  for (size_t pos = 0; pos < s.size();) {
    const size_t end = std::min(s.find(',', pos), s.size());
    const std::string kv = s.substr(pos, end - pos);
    const size_t eq = kv.find('=');
    char* rest = nullptr;
    const long n = eq == std::string::npos ? 0 : std::strtol(kv.c_str() + eq + 1, &rest, 10);
    TORCH_CHECK(eq != std::string::npos && rest != nullptr && *rest == '\0' && n > 0,
                "KL_EXT_CUDA_ROWS: expected key=value pairs of positive integers, like "
                "min_threads=128,threads=256,items=8,cluster=8,stream_waves=1; got '", s, "'");
    const std::string k = kv.substr(0, eq);
    int* field = k == "min_threads" ? &t.min_threads : k == "threads" ? &t.threads : k == "items" ? &t.items
               : k == "cluster" ? &t.cluster : k == "stream_waves" ? &t.stream_waves : nullptr;
    TORCH_CHECK(field != nullptr, "KL_EXT_CUDA_ROWS: unknown key '", k,
                "' (min_threads, threads, items, cluster, stream_waves)");
    *field = int(n);
    pos = end + 1;
  }
  const auto pow2 = [](int v, int hi) { return v <= hi && (v & (v - 1)) == 0; };
  TORCH_CHECK(t.threads % 32 == 0 && t.threads <= kHeldMaxThreads<1> && pow2(t.items, kHeldPacks) &&
                  pow2(t.cluster, 16) && t.stream_waves <= 32,
              "KL_EXT_CUDA_ROWS: threads a multiple of 32 up to ", kHeldMaxThreads<1>, ", items 1, 2, 4 or 8, cluster ",
              "1, 2, 4, 8 or 16, stream_waves up to 32; got '", s, "'");
  return t;
}

struct KLConfig {
  int items, threads, cluster;  // cluster: blocks per row
  bool held;
};

// The most packs per thread (up to t.items) that leave the row at least t.min_threads threads; in one block of
// <= t.threads if it fits, else the smallest cluster of t.items-pack blocks of <= t.threads, and (8 packs per
// thread) at the largest cluster blocks of up to kWideThreads; else streamed.
inline KLConfig kl_config(int64_t npacks, bool clusters, const RowTune& t) {
  int items = t.items;
  while (items > 1 && ceil_div(npacks, items) < t.min_threads) items /= 2;
  const int64_t threads = round_up(std::max<int64_t>(ceil_div(npacks, items), 1), 32);
  if (threads <= t.threads) return {items, int(threads), 1, true};
  const int top = clusters ? t.cluster : 1;
  for (int size = 2; size <= top; size *= 2) {
    const int64_t per_block = round_up(ceil_div(ceil_div(npacks, size), t.items), 32);
    if (per_block <= t.threads) return {t.items, int(per_block), size, true};
  }
  const int64_t wide = round_up(ceil_div(ceil_div(npacks, top), t.items), 32);
  if (t.items == kHeldPacks && wide <= kWideThreads) return {t.items, int(wide), top, true};
  return {kStreamPacks, kWideThreads, 1, false};
}

// launch(items) with the packs per thread (1, 2, 4, 8) as a compile-time constant.
template <typename F>
void with_items(int items, const F& launch) {
  switch (items) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: launch(std::integral_constant<int, kHeldPacks>{}); break;
  }
}

// Launches held(items), the held kernel for that many packs per thread, in configuration c: one block, or on sm_90 a
// cluster of c.cluster blocks, per row of npacks packs (each block a slice of them), up to the grid's limit, beyond
// which blocks loop over rows. The kernel takes (a, cluster, slice). Shared by the engine's kernels.
template <typename Args, typename Held>
void launch_held(const KLConfig& c, int64_t rows, int64_t npacks, const KLDevice& dev, cudaStream_t stream,
                 const Args& a, const Held& held) {
  const int64_t grid_rows = std::max<int64_t>(1, std::min<int64_t>(rows, dev.max_blocks / c.cluster));
  const int slice = int(ceil_div(npacks, c.cluster));
  with_items(c.items, [&](auto items) {
    auto kernel = held(items);
    if (c.cluster > 1) {
      KL_EXT_LAUNCH_CLUSTER(kernel, dim3(unsigned(grid_rows * c.cluster)), dim3(c.threads), c.cluster, stream, a,
                            c.cluster, slice);
    } else {
      KL_EXT_LAUNCH(kernel, dim3(unsigned(grid_rows)), dim3(c.threads), stream, a, 1, slice);
    }
  });
}

// Held rows for the 16/32-bit dtypes in 16-byte packs; float64 (tests and gradcheck: correctness, not speed)
// and rows not in packs stream, which keeps the build to one held kernel per dtype pair and packs per thread.
template <typename scalar_t, typename target_t, int VEC, typename Loss>
void launch_kl(const KLArgs<scalar_t, target_t>& a, const KLDevice& dev, cudaStream_t stream) {
  const RowTune tune = row_tune();
  if constexpr (!std::is_same_v<scalar_t, double> && VEC > 1) {
    RowTune t = tune;
    if (a.shard != nullptr) {  // the vocab-parallel modes: one block per row, up to 4 packs per thread
      t.items = std::min(t.items, kHeldPacks / 2);
      t.cluster = 1;
    }
    const KLConfig c = kl_config(a.V / VEC, dev.clusters, t);
    if (c.held) {
      launch_held(c, a.N, a.V / VEC, dev, stream, a,
                  [](auto items) { return kl_held_kernel<scalar_t, target_t, VEC, decltype(items)::value, Loss>; });
      return;
    }
  }
  auto kernel = kl_stream_kernel<scalar_t, target_t, VEC, Loss>;
  const int64_t blocks = std::min<int64_t>(a.N, int64_t(dev.sms) * tune.stream_waves);
  KL_EXT_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(kWideThreads), stream, a);
}
// Both ops on device tensors of one dtype pair, after their checks (call, which says which loss). A template
// of its own, so that the CUDA build compiles each pair in its own translation unit (softmax_rows_pairs.cuh).
template <typename scalar_t, typename target_t>
void softmax_rows_typed(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                        const c10::optional<at::Tensor>& mask, double temperature,
                        const c10::optional<at::Tensor>& grad_scale, const KLDevice& dev, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = num_rows(input), V = input.size(-1);
  TORCH_CHECK(V <= INT32_MAX, "kl_ext: the CUDA kernels take rows of up to 2^31 - 1 classes, got ", V,
              "; use backend='triton'");
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
                                     call.divergence,
                                     acc_t(call.param),
                                     call.shard.defined() ? call.shard.mutable_data_ptr<acc_t>() : nullptr,
                                     call.given.defined() ? call.given.const_data_ptr<acc_t>() : nullptr};
  constexpr int VEC = pair_vec<scalar_t, target_t>();
  const bool packs = V % VEC == 0 && packs_aligned<VEC>(a.x, a.gx) && packs_aligned<VEC>(a.t, a.gt) &&
                     a.rx.steps_of(VEC) && a.rt.steps_of(VEC);
  if (call.is_divergence) {
    packs ? launch_kl<scalar_t, target_t, VEC, DivergenceLoss>(a, dev, stream)
          : launch_kl<scalar_t, target_t, 1, DivergenceLoss>(a, dev, stream);
  } else {
    packs ? launch_kl<scalar_t, target_t, VEC, KLLoss>(a, dev, stream)
          : launch_kl<scalar_t, target_t, 1, KLLoss>(a, dev, stream);
  }
}

// Both ops on device tensors, input and target each read in its own dtype (the pairs of dispatch_pair). A template
// (Device is always KLDevice) so that it is compiled only where it is called (kl_div_with_logits.cu, the emulator),
// not in every unit that includes this header for its helpers (the sparse kernel's), which would compile every
// pair's kernels there again.
template <typename Device = KLDevice>
void softmax_rows_cuda(const KLCall& call, const at::Tensor& input, const at::Tensor& target,
                       const c10::optional<at::Tensor>& mask, double temperature,
                       const c10::optional<at::Tensor>& grad_scale, const Device& dev, cudaStream_t stream) {
  if (num_rows(input) == 0) return;
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto x_tag, auto t_tag) {
    softmax_rows_typed<decltype(x_tag), decltype(t_tag)>(call, input, target, mask, temperature, grad_scale,
                                                         dev, stream);
  });
}

}  // namespace cuda
}  // namespace kl_ext
