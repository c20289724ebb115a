// bernoulli_kl_div_with_logits (and BCE with logits): the CUDA kernel and its host entry (contract and formulas:
// csrc/bernoulli_kl_div_with_logits.cpp). Included by bernoulli_kl_div_with_logits.cu and by tests/cuda_emu.
//
// Elementwise, with per-row sums: a row is owned by a group of `group` lanes of one warp (1 for a few classes,
// up to the whole warp for wide rows), which sum in a fixed order and combine with shuffles: deterministic, no
// atomics, no shared memory. 16-byte loads and stores when the row length allows them.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <tuple>

#include "../common.h"
#include "common.cuh"

namespace kl_ext {
namespace cuda {

template <typename scalar_t, typename target_t = scalar_t>
struct BernoulliArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const target_t* t;  // read in its own dtype (the pairs of dispatch_pair)
  RowLayout rx, rt;  // where rows of x and t start (losses and gradients: row * C)
  const acc_t* w;   // nullptr: 1
  const acc_t* pw;  // nullptr: 1
  acc_t* loss;      // (N,) row sums, or (N, C) when elementwise
  scalar_t* gx;     // nullptr: not wanted
  target_t* gt;     // nullptr: not wanted
  const acc_t* gs;  // grad_scale on the device, nullptr: 1
  int64_t N, C, w_numel, pw_numel;
  acc_t inv_t;
  bool target_logits, entropy, elementwise;
  int group;  // lanes per row: a power of two <= 32
};

template <typename T>
__host__ __device__ __forceinline__ T softplus_neg(T z, T e_abs) {
  return kmax(-z, T(0)) + flog1p(e_abs);  // softplus(-z), e_abs = exp(-|z|)
}

template <typename T>
__host__ __device__ __forceinline__ T sigmoid_from(T z, T e_abs) {
  const T d = fdiv(T(1), T(1) + e_abs);
  return z >= T(0) ? d : e_abs * d;
}

constexpr int kBernoulliThreads = 256;

// One element: its loss (times the weight) and its gradients (d/d input times inv_t * gs, d/d target times gs).
// Fast float math (common.cuh): with accurate libm calls this was bound by instructions, not memory.
template <typename T>
__device__ __forceinline__ T bernoulli_elem(T x, T t, T w, T pw, T inv_t, bool target_logits, bool entropy, T& gx,
                                            T& gt) {
  const T z = x * inv_t, ez = fexp(-(z < T(0) ? -z : z)), spz = softplus_neg(z, ez);
  T p, l, u = T(0), lp = T(0), lq = T(0);
  if (target_logits) {
    u = t * inv_t;
    const T eu = fexp(-(u < T(0) ? -u : u));
    p = sigmoid_from(u, eu);
    l = (T(1) - p) * (z - u) + spz - softplus_neg(u, eu);  // exactly 0 when z == u
  } else {
    p = t;
    l = (T(1) - p) * z + (T(1) + (pw - T(1)) * p) * spz;
    if (entropy) {  // + p log p + (1 - p) log(1 - p), 0 log 0 = 0; the logs serve the target gradient too
      const T p1 = T(1) - p;
      lp = flog(p);
      lq = flog(p1);
      l += (p > T(0) ? p * lp : T(0)) + (p1 > T(0) ? p1 * lq : T(0));
    }
  }
  gx = w * ((T(1) + (pw - T(1)) * p) * sigmoid_from(z, ez) - pw * p);
  if (target_logits) gt = -p * (T(1) - p) * (z - u) * inv_t;
  else if (entropy) gt = lp - lq - z;
  else gt = (pw - T(1)) * spz - z;
  gt *= w;
  return l * w;
}

// VEC elements per load (16 bytes when rows allow, else 1); 16 elements (8 for double) per lane and iteration,
// all loaded before any is computed, so each lane keeps 2 - 4 loads of each input in flight.
template <typename scalar_t, typename target_t, int VEC>
__global__ void __launch_bounds__(kBernoulliThreads)
    bernoulli_rows_kernel(const BernoulliArgs<scalar_t, target_t> a) {
  using T = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  using PT = Pack<target_t, VEC>;
  constexpr int U = VEC >= 8 ? 2 : 4;
  const int lane = threadIdx.x & 31, group = a.group, sub = lane & (group - 1);
  const int rows_per_warp = 32 / group;
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t warp_stride = int64_t(gridDim.x) * (blockDim.x >> 5) * rows_per_warp;
  const int64_t npacks = a.C / VEC;
  const T gs = a.gs != nullptr ? *a.gs : T(1), gx_f = a.inv_t * gs;
  // The loop bound is the same for the whole warp, so every lane reaches the shuffles.
  for (int64_t first = warp * rows_per_warp; first < a.N; first += warp_stride) {
    const int64_t row = first + lane / group;
    T total = T(0);
    if (row < a.N) {
      const int64_t off = row * a.C;
      const P* xr = row_packs<VEC>(a.x, a.rx, row);
      const PT* tr = row_packs<VEC>(a.t, a.rt, row);
      for (int64_t j0 = sub; j0 < npacks; j0 += int64_t(U) * group) {
        P xv[U];
        PT tv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = j0 + int64_t(u) * group;
          if (j < npacks) {
            xv[u] = xr[j];
            tv[u] = tr[j];
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = j0 + int64_t(u) * group;
          if (j >= npacks) continue;
          P gxp;
          PT gtp;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int64_t c = j * VEC + e;
            const T w = a.w != nullptr ? a.w[a.w_numel == a.C ? c : off + c] : T(1);
            const T pw = a.pw != nullptr ? a.pw[a.pw_numel == a.C ? c : off + c] : T(1);
            T gx, gt;
            const T l = bernoulli_elem(to_acc(xv[u].v[e]), to_acc(tv[u].v[e]), w, pw, a.inv_t, a.target_logits,
                                       a.entropy, gx, gt);
            if (a.elementwise) a.loss[off + c] = l;
            else total += l;
            // Only the gradients wanted are rounded (software rounding to 16 bits costs ~5 instructions each).
            if (a.gx != nullptr) gxp.v[e] = static_cast<scalar_t>(gx * gx_f);
            if (a.gt != nullptr) gtp.v[e] = static_cast<target_t>(gt * gs);
          }
          if (a.gx != nullptr) reinterpret_cast<P*>(a.gx + off)[j] = gxp;
          if (a.gt != nullptr) reinterpret_cast<PT*>(a.gt + off)[j] = gtp;
        }
      }
    }
    for (int o = group >> 1; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (row < a.N && sub == 0 && !a.elementwise) a.loss[row] = total;
  }
}

// Lanes per row: about 16 elements per lane, at most a warp.
inline int bernoulli_group(int64_t C) {
  int g = 1;
  while (g < 32 && int64_t(g) * 16 < C) g <<= 1;
  return g;
}

// The op on device tensors. sms: the device's SM count (sizes the grid).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bernoulli_kl_div_with_logits_fwd_impl(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, c10::string_view target_type, double temperature,
    bool subtract_entropy, bool elementwise, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale, int sms, cudaStream_t stream) {
  BernoulliCall call = prepare_bernoulli(input, target, weight, pos_weight, target_type, temperature,
                                         subtract_entropy, elementwise, grad_input, grad_target, grad_scale);
  const int64_t N = num_rows(input), C = input.size(-1);
  if (N == 0) return {call.loss, call.gx, call.gt};
  const int group = bernoulli_group(C);
  const int64_t rows_per_block = int64_t(kBernoulliThreads / 32) * (32 / group);
  const dim3 grid(unsigned(std::min<int64_t>(ceil_div(N, rows_per_block), int64_t(sms) * (2048 / kBernoulliThreads)))),
      block(kBernoulliThreads);
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto x_tag, auto t_tag) {
    using scalar_t = decltype(x_tag);
    using target_t = decltype(t_tag);
    using acc_t = at::opmath_type<scalar_t>;
    const BernoulliArgs<scalar_t, target_t> a{input.const_data_ptr<scalar_t>(),
                                              target.const_data_ptr<target_t>(),
                                              row_layout(input),
                                              row_layout(target),
                                              weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr,
                                              pos_weight.has_value() ? pos_weight->const_data_ptr<acc_t>() : nullptr,
                                              call.loss.mutable_data_ptr<acc_t>(),
                                              grad_input ? call.gx.mutable_data_ptr<scalar_t>() : nullptr,
                                              grad_target ? call.gt.mutable_data_ptr<target_t>() : nullptr,
                                              grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr,
                                              N,
                                              C,
                                              weight.has_value() ? weight->numel() : 0,
                                              pos_weight.has_value() ? pos_weight->numel() : 0,
                                              acc_t(1.0 / temperature),
                                              call.target_logits,
                                              subtract_entropy,
                                              elementwise,
                                              group};
    constexpr int VEC = pair_vec<scalar_t, target_t>();
    if (C % VEC == 0 && packs_aligned<VEC>(a.x, a.gx) && packs_aligned<VEC>(a.t, a.gt) && a.rx.steps_of(VEC) &&
        a.rt.steps_of(VEC)) {
      auto kernel = bernoulli_rows_kernel<scalar_t, target_t, VEC>;
      KL_EXT_LAUNCH(kernel, grid, block, stream, a);
    } else {
      auto kernel = bernoulli_rows_kernel<scalar_t, target_t, 1>;
      KL_EXT_LAUNCH(kernel, grid, block, stream, a);
    }
  });
  return {call.loss, call.gx, call.gt};
}

}  // namespace cuda
}  // namespace kl_ext
