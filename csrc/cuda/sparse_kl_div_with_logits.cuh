// sparse_kl_div_with_logits: the CUDA kernels and their host entry (contract and formulas:
// csrc/sparse_kl_div_with_logits.cpp). Included by sparse_kl_div_with_logits.cu and by tests/cuda_emu.
//
// The student row runs on the KL's row engine (kl_div_with_logits.cuh): its launch shapes (held in registers with
// 1 - 8 packs per thread, split over a cluster on sm_90, else streamed; KL_EXT_CUDA_ROWS), packs, block and
// cluster reductions; only the sparse teacher's per-slot math is new. The tail sum Q_tail must cover exactly the
// classes outside the support, so each block first marks the support within its part of the row in a bitmap in
// shared memory, and the statistics sum the exponentials of all classes and of the unmarked ones. Indices outside
// [0, V) are skipped: no slot ever reads or writes out of bounds. Gradients: every class's non-support gradient
// is written, then (after a barrier) the support's entries are overwritten with theirs by the block holding them.
#pragma once
#include "kl_div_with_logits.cuh"

namespace kl_ext {
namespace cuda {

template <typename scalar_t>
struct SparseArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  RowLayout rx;        // where rows of x start (gradients: row * V)
  const int64_t* idx;  // (N, K); -1: empty slot
  const acc_t* val;    // (N, K)
  const bool* mask;    // nullptr: every row counts
  acc_t* loss;         // (N,)
  scalar_t* gx;        // nullptr: not wanted
  acc_t* gv;           // (N, K), nullptr: not wanted
  const acc_t* gs;     // grad_scale on the device, nullptr: 1
  int64_t N, V, K;
  acc_t inv_t;
  TargetType target;
  bool normalize;      // teacher renormalized over its support: no tail term
};

// Largest V whose support bitmap fits the shared memory a block may opt into (227 KB on sm_90).
constexpr int64_t kMaxSparseClasses = int64_t(200) * 1024 * 8;

__device__ __forceinline__ bool is_member(const uint32_t* member, int64_t c) {
  return (member[c >> 5] >> (c & 31)) & 1u;
}

// Slot s of a row: its class, or -1 for an empty slot or an index outside [0, V).
template <typename scalar_t>
__device__ __forceinline__ int64_t slot_class(const SparseArgs<scalar_t>& a, int64_t row, int64_t s) {
  const int64_t i = a.idx[row * a.K + s];
  return i >= 0 && i < a.V ? i : -1;
}

// The teacher's log-weight of a slot (natural log), in double: logits v / T, log-probs v, probs log v. The tail
// bucket 1 - sum_S p is a difference near 1 - 1, so its slot sums are taken in double from the exact values
// (k per row: cheap).
template <typename T>
__device__ __forceinline__ double teacher_w(T v, TargetType tt, T inv_t) {
  if (tt == TargetType::Logits) return double(v) * double(inv_t);
  if (tt == TargetType::LogProbs) return double(v);
  return log(double(v));
}

// A thread's student statistics, base 2: running max, and the sums of exp2 over all its classes and over those
// outside the support.
template <typename T>
struct TailState {
  T m, d_all, d_tail;
};

template <int K, typename scalar_t, int VEC, typename T>
__device__ __forceinline__ void fold_tail(TailState<T>& st, const Pack<scalar_t, VEC>* px, int64_t j0, int64_t stride,
                                          int64_t npacks, const uint32_t* member, T scale2) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = j0 + k * stride;
    if (j >= npacks) continue;
    T pm = to_acc(px[k].v[0]);
#pragma unroll
    for (int e = 1; e < VEC; ++e) pm = kmax(pm, to_acc(px[k].v[e]));
    pm = kmul(pm, scale2);
    if (pm > st.m) {
      const Move<T> mv = move(st.m, pm);
      st = {pm, st.d_all * mv.scale, st.d_tail * mv.scale};
    }
    const T sh = safe_shift(st.m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T es = kexp2(kmul(to_acc(px[k].v[e]), scale2) - sh);
      st.d_all += es;
      if (!is_member(member, j * VEC + e)) st.d_tail += es;
    }
  }
}

// The row's scalars, from the maxima (student, base 2; teacher log-weights) and the sums (student d_all and
// d_tail relative to its max; teacher sum of exp(w - max) in natural log; valid slots).
template <typename T>
struct SparseRow {
  T m_s, log_d;         // base 2: the student's max and log2 of its sum (+inf for a row with no mass)
  double lse_w;         // natural; -inf for a support with no mass
  T P, p_tail, log_qt;  // the teacher's mass on S, its tail bucket, log Q_tail (natural)
  T c, an;              // gradient weights: c q_j - p_j on S; an * exp2(z_j - m_s) elsewhere
};

template <typename T>
__device__ __forceinline__ SparseRow<T> sparse_row(const Vals<T, 2>& m, const Vals<double, 4>& s, bool normalize,
                                                    int64_t V) {
  SparseRow<T> r;
  r.m_s = safe_shift(m.v[0]);
  r.log_d = s.v[0] > 0.0 ? T(log2(s.v[0])) : kinf<T>();
  r.lse_w = s.v[2] > 0.0 ? double(safe_shift(m.v[1])) + log(s.v[2]) : -kinf<double>();
  r.P = normalize ? T(r.lse_w > -kinf<double>()) : T(exp(r.lse_w));
  r.p_tail = normalize || int64_t(s.v[3]) == V ? T(0) : T(-expm1(r.lse_w) > 0.0 ? -expm1(r.lse_w) : 0.0);
  r.log_qt = s.v[1] > 0.0 ? T(log(s.v[1]) - log(s.v[0])) : -kinf<T>();
  r.c = r.P + r.p_tail;
  r.an = T(double(r.c) / s.v[0] - (r.p_tail > T(0) ? double(r.p_tail) / s.v[1] : 0.0));
  return r;
}

// A slot's teacher prob p, the student's log2-prob ls2 and d = lp - ls (natural log); i = -1 for a slot that is
// not there.
template <typename T>
struct SlotTerms {
  int64_t i;
  T p, d, ls2;
};

template <typename scalar_t, typename T>
__device__ __forceinline__ SlotTerms<T> slot_terms(const SparseArgs<scalar_t>& a, int64_t row, int64_t s,
                                                   const SparseRow<T>& r, T scale2) {
  SlotTerms<T> t{slot_class(a, row, s), T(0), T(0), T(0)};
  if (t.i < 0) return t;
  const T v = a.val[row * a.K + s], ln2 = T(kLn2);
  // (z - max) - log2(sum): no large log-sum-exp (logits of 25 would cost 1e-6 absolute) to cancel.
  t.ls2 = (kmul(to_acc(a.x[a.rx(row) + t.i]), scale2) - r.m_s) - r.log_d;
  T lp;
  if (a.normalize) {
    lp = r.P > T(0) ? T(teacher_w(v, a.target, a.inv_t) - r.lse_w) : -kinf<T>();
    t.p = kexp(lp);
  } else if (a.target == TargetType::LogProbs) {
    lp = v;
    t.p = kexp(v);
  } else {
    lp = klog(v);
    t.p = v;
  }
  t.d = lp - t.ls2 * ln2;
  return t;
}

// The slot-side steps of a row, shared by the held and streamed kernels; every thread of the block calls each.

// Marks the support's classes in [lo, lo + n) (the block's part of the row) in its bitmap, as bits c - lo.
template <typename scalar_t>
__device__ __forceinline__ void mark_support(const SparseArgs<scalar_t>& a, int64_t row, uint32_t* member,
                                             int64_t lo, int64_t n) {
  __syncthreads();  // every thread is done with the previous row's bitmap
  for (int64_t w = threadIdx.x; w < ((n + 31) >> 5); w += blockDim.x) member[w] = 0u;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    const int64_t i = slot_class(a, row, s);
    if (i >= lo && i < lo + n) atomicOr(&member[(i - lo) >> 5], 1u << ((i - lo) & 31));
  }
  __syncthreads();
}

// This thread's share of the teacher's largest log-weight: a shift for its sum (rounded to T, still exact).
template <typename T, typename scalar_t>
__device__ __forceinline__ T teacher_max(const SparseArgs<scalar_t>& a, int64_t row) {
  T mw = -kinf<T>();
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    if (slot_class(a, row, s) >= 0) mw = kmax(mw, T(teacher_w(a.val[row * a.K + s], a.target, a.inv_t)));
  }
  return mw;
}

// This thread's share of the teacher's sums: exp(w - mw) and the count of valid slots, in double.
template <typename T, typename scalar_t>
__device__ __forceinline__ void add_teacher_sums(const SparseArgs<scalar_t>& a, int64_t row, T mw,
                                                 Vals<double, 4>& sums) {
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    if (slot_class(a, row, s) < 0) continue;
    sums.v[2] += exp(teacher_w(a.val[row * a.K + s], a.target, a.inv_t) - double(safe_shift(mw)));
    sums.v[3] += 1.0;
  }
}

// The row's head term sum_S p (lp - ls) (a block reduction; red: 32 values of shared memory).
template <typename T, typename scalar_t>
__device__ __forceinline__ T sparse_head(const SparseArgs<scalar_t>& a, int64_t row, const SparseRow<T>& r,
                                         T scale2, Vals<double, 4>* red) {
  using Sums = Vals<double, 4>;
  double head = 0.0;
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    const SlotTerms<T> t = slot_terms(a, row, s, r, scale2);
    if (t.p > T(0)) head += double(t.p) * double(t.d);
  }
  return T(block_allreduce(Sums{{head, 0.0, 0.0, 0.0}}, red, Sums{}, SumOp()).v[0]);
}

template <typename T>
__device__ __forceinline__ T sparse_loss(const SparseRow<T>& r, T h) {
  return h + (r.p_tail > T(0) ? r.p_tail * (klog(r.p_tail) - r.log_qt) : T(0));
}

// The non-support gradient an * exp2(z - m_s) of packs j0 + k * stride below npacks (held or just loaded), at
// gx + off; f = 1 / T times grad_scale.
template <int K, typename scalar_t, int VEC, typename T>
__device__ __forceinline__ void store_tail_grads(const Pack<scalar_t, VEC>* px, int j0, int stride, int npacks,
                                                 int64_t off, scalar_t* gx, const SparseRow<T>& r, T scale2, T f) {
  const T an = r.an * f;
  store_grads<K, scalar_t, VEC>(j0, stride, npacks, off, gx, static_cast<scalar_t*>(nullptr),
                                [&](int k, int e, scalar_t& ox, scalar_t&) {
    ox = static_cast<scalar_t>(kexp2(kmul(to_acc(px[k].v[e]), scale2) - r.m_s) * an);
  });
}

// The support's input gradients among classes [lo, lo + n) (the block's part), over its non-support ones once
// every thread of the block has written those.
template <typename T, typename scalar_t>
__device__ __forceinline__ void write_support_grads(const SparseArgs<scalar_t>& a, int64_t row,
                                                    const SparseRow<T>& r, T scale2, T f, int64_t lo, int64_t n) {
  __syncthreads();
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    const int64_t i = slot_class(a, row, s);
    if (i < lo || i >= lo + n) continue;  // an empty slot, or another block's
    const SlotTerms<T> t = slot_terms(a, row, s, r, scale2);
    a.gx[row * a.V + i] = static_cast<scalar_t>((r.c * kexp2(t.ls2) - t.p) * f);
  }
}

// The gradients of the teacher's values (h: the head term).
template <typename T, typename scalar_t>
__device__ __forceinline__ void write_value_grads(const SparseArgs<scalar_t>& a, int64_t row, const SparseRow<T>& r,
                                                  T h, T scale2, T gs) {
  const T tl = r.p_tail > T(0) ? klog(r.p_tail) - r.log_qt + T(1) : T(0);
  const T dw = a.target == TargetType::Logits ? a.inv_t : T(1);
  for (int64_t s = threadIdx.x; s < a.K; s += blockDim.x) {
    const SlotTerms<T> t = slot_terms(a, row, s, r, scale2);
    T g = T(0);
    if (t.i < 0) {
    } else if (a.normalize) {
      // probs: dw/dv = 1 / v, and p / v = exp(-lse_w); -inf at v = 0, as the math says.
      g = a.target == TargetType::Probs ? (t.d - h) * T(exp(-r.lse_w)) : (t.p > T(0) ? t.p * (t.d - h) : T(0)) * dw;
    } else {
      g = a.target == TargetType::Probs ? t.d + T(1) - tl : (t.p > T(0) ? t.p * (t.d + T(1) - tl) : T(0));
    }
    a.gv[row * a.K + s] = g * gs;
  }
}

// A masked row: loss 0 and zero gradients (the block's part of gx: count packs at off; the values' if `first`).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void sparse_masked_row(const SparseArgs<scalar_t>& a, int64_t row, int64_t off,
                                                  int count, bool first) {
  zero_grads<scalar_t, VEC>(a.gx, static_cast<scalar_t*>(nullptr), off, count);
  if (!first) return;
  if (threadIdx.x == 0) a.loss[row] = 0;
  for (int64_t s = threadIdx.x; a.gv != nullptr && s < a.K; s += blockDim.x) a.gv[row * a.K + s] = 0;
}

// The row engine (kl_held_kernel's launch shapes: kl_config) for the sparse teacher: the student row held in
// registers, ITEMS packs per thread, by one block or (sm_90) a cluster of `cluster` blocks, block `rank` holding
// packs [rank * slice, (rank + 1) * slice) and the support's bits within them. Maxima and sums over the block,
// then the cluster (distributed shared memory), in a fixed order; the slots' loss and value gradients in the
// cluster's first block. The student row is read once and its gradient written once.
template <typename scalar_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kHeldMaxThreads<ITEMS>, kHeldMinBlocks<ITEMS>)
    sparse_held_kernel(const SparseArgs<scalar_t> a, int cluster, int slice) {
  using T = at::opmath_type<scalar_t>;
  using Max2 = Vals<T, 2>;
  using Sums = Vals<double, 4>;
  KL_EXT_SHARED(uint32_t, member, (ITEMS * kHeldMaxThreads<ITEMS> * VEC + 31) / 32);
  const T scale2 = a.inv_t * T(kLog2e);
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  const int stride = blockDim.x, tid = threadIdx.x;
  const auto blk = HeldBlock<Max2, Sums>::make(cluster, slice, int(a.V / VEC));
  const int lo = blk.lo, count = blk.count;
  const bool first = blk.rank == 0;
  for (int64_t row = blockIdx.x / cluster; row < a.N; row += gridDim.x / cluster) {
    const int64_t off = row * a.V + int64_t(lo) * VEC;  // this block's part of the gradient
    if (a.mask != nullptr && !a.mask[row]) {
      sparse_masked_row<scalar_t, VEC>(a, row, off, count, first);
      continue;
    }
    Pack<scalar_t, VEC> px[ITEMS];
    load_packs<ITEMS>(px, row_packs<VEC>(a.x, a.rx, row) + lo, tid, stride, count);
    mark_support(a, row, member, int64_t(lo) * VEC, int64_t(count) * VEC);
    // Every block takes the teacher's max over all k slots (a max is unchanged by repeats): no extra reduction.
    const Max2 m = blk.max(Max2{{held_max<ITEMS>(px, px, tid, stride, count, false, scale2).v[0],
                                 teacher_max<T>(a, row)}});
    TailState<T> st{m.v[0], T(0), T(0)};  // sums relative to the row's max: nothing is rescaled
    fold_tail<ITEMS>(st, px, tid, stride, count, member, scale2);
    Sums sums{{st.d_all, st.d_tail, 0.0, 0.0}};
    if (first) add_teacher_sums(a, row, m.v[1], sums);
    const SparseRow<T> r = sparse_row(m, blk.sum(sums), a.normalize, a.V);
    T h = T(0);
    if (first) {
      h = sparse_head(a, row, r, scale2, blk.red_sum);
      if (tid == 0) a.loss[row] = sparse_loss(r, h);
    }
    if (a.gx != nullptr) {
      const T f = a.inv_t * gs;
      store_tail_grads<ITEMS>(px, tid, stride, count, off, a.gx, r, scale2, f);
      write_support_grads(a, row, r, scale2, f, int64_t(lo) * VEC, int64_t(count) * VEC);
    }
    if (a.gv != nullptr && first) write_value_grads(a, row, r, h, scale2, gs);
  }
}

// Rows the engine does not hold (float64, rows not in 16-byte packs, longer rows): streamed by one block,
// kStreamPacks packs per thread at a time, a wave of blocks looping over rows; the support's bitmap covers the
// whole row (dynamic shared memory, V / 8 bytes). One read with online statistics, a second for the gradients
// (mostly from L2 while few rows are in flight).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWideThreads) sparse_stream_kernel(const SparseArgs<scalar_t> a) {
  using T = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  using Sums = Vals<double, 4>;
  constexpr int ITEMS = kStreamPacks;
  __shared__ Vals<T, 2> red_max[32];
  __shared__ Sums red_sum[32];
  KL_EXT_DYN_SHARED(uint32_t, member, (a.V + 31) >> 5);
  const T scale2 = a.inv_t * T(kLog2e), ninf = -kinf<T>();
  const T gs = a.gs != nullptr ? *a.gs : T(1);
  const int npacks = int(a.V / VEC), stride = blockDim.x, tid = threadIdx.x;
  P px[ITEMS];
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const int64_t off = row * a.V;  // of the gradient
    const P* xr = row_packs<VEC>(a.x, a.rx, row);
    if (a.mask != nullptr && !a.mask[row]) {
      sparse_masked_row<scalar_t, VEC>(a, row, off, npacks, true);
      continue;
    }
    mark_support(a, row, member, 0, a.V);
    TailState<T> st{ninf, T(0), T(0)};
    for (int j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
      load_packs<ITEMS>(px, xr, j0, stride, npacks);
      fold_tail<ITEMS>(st, px, j0, stride, npacks, member, scale2);
    }
    const Vals<T, 2> m = block_allreduce(Vals<T, 2>{{st.m, teacher_max<T>(a, row)}}, red_max,
                                         Vals<T, 2>{{ninf, ninf}}, MaxOp());
    // Moved to the row max in double (fp32 rescaling would leave ~1e-7 relative error in the sums).
    const double sc = st.m == ninf ? 0.0 : exp2(double(st.m) - double(m.v[0]));
    Sums sums{{double(st.d_all) * sc, double(st.d_tail) * sc, 0.0, 0.0}};
    add_teacher_sums(a, row, m.v[1], sums);
    const SparseRow<T> r = sparse_row(m, block_allreduce(sums, red_sum, Sums{}, SumOp()), a.normalize, a.V);
    const T h = sparse_head(a, row, r, scale2, red_sum);
    if (tid == 0) a.loss[row] = sparse_loss(r, h);
    if (a.gx != nullptr) {
      const T f = a.inv_t * gs;
      for (int j0 = tid; j0 < npacks; j0 += ITEMS * stride) {
        load_packs<ITEMS>(px, xr, j0, stride, npacks);
        store_tail_grads<ITEMS>(px, j0, stride, npacks, off, a.gx, r, scale2, f);
      }
      write_support_grads(a, row, r, scale2, f, 0, a.V);
    }
    if (a.gv != nullptr) write_value_grads(a, row, r, h, scale2, gs);
  }
}

// The engine's launch shapes (kl_config, KL_EXT_CUDA_ROWS) for the 16/32-bit dtypes in 16-byte packs; the rest
// streams, as the KL's.
template <typename scalar_t, int VEC>
void launch_sparse(const SparseArgs<scalar_t>& a, const KLDevice& dev, cudaStream_t stream) {
  const RowTune tune = row_tune();
  if constexpr (!std::is_same_v<scalar_t, double> && VEC > 1) {
    const KLConfig c = kl_config(a.V / VEC, dev.clusters, tune);
    if (c.held) {
      launch_held(c, a.N, a.V / VEC, dev, stream, a,
                  [](auto items) { return sparse_held_kernel<scalar_t, VEC, decltype(items)::value>; });
      return;
    }
  }
  auto kernel = sparse_stream_kernel<scalar_t, VEC>;
  const dim3 grid(unsigned(std::min<int64_t>(a.N, int64_t(dev.sms) * tune.stream_waves)));
  const size_t smem = size_t(ceil_div(a.V, 32)) * sizeof(uint32_t);
  KL_EXT_LAUNCH_SMEM(kernel, grid, dim3(kWideThreads), smem, stream, a);
}

// The op on device tensors, after its checks (call).
inline void sparse_kl_cuda(const SparseCall& call, const at::Tensor& input, const at::Tensor& indices,
                           const at::Tensor& values, const c10::optional<at::Tensor>& mask, double temperature,
                           const c10::optional<at::Tensor>& grad_scale, const KLDevice& dev, cudaStream_t stream) {
  const int64_t N = num_rows(input), V = input.size(-1);
  TORCH_CHECK(V <= kMaxSparseClasses, "kl_ext: the CUDA sparse_kl_div_with_logits takes up to ", kMaxSparseClasses,
              " classes (its support bitmap lives in shared memory), got ", V, "; use backend='triton'");
  if (N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SparseArgs<scalar_t> a{input.const_data_ptr<scalar_t>(),
                                 row_layout(input),
                                 indices.const_data_ptr<int64_t>(),
                                 values.const_data_ptr<acc_t>(),
                                 mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
                                 call.loss.mutable_data_ptr<acc_t>(),
                                 call.gx.numel() > 0 ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
                                 call.gv.numel() > 0 ? call.gv.mutable_data_ptr<acc_t>() : nullptr,
                                 grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr,
                                 N,
                                 V,
                                 indices.size(1),
                                 acc_t(1.0 / temperature),
                                 call.target_type,
                                 call.normalize};
    constexpr int VEC = vec_size<scalar_t>();
    const bool packs = V % VEC == 0 && packs_aligned<VEC>(a.x, a.gx) && a.rx.steps_of(VEC);
    packs ? launch_sparse<scalar_t, VEC>(a, dev, stream) : launch_sparse<scalar_t, 1>(a, dev, stream);
  });
}

}  // namespace cuda
}  // namespace kl_ext
