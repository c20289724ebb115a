// bernoulli_kl_div_with_logits: CPU kernel (schema: kl_ext/_ops.py). One elementwise kernel family serves both the
// sigmoid-Bernoulli KL (subtract_entropy=true) and binary_cross_entropy_with_logits (subtract_entropy=false,
// optional pos_weight): they share the cross-entropy term and the gradient w.r.t. the input.
//
// With z = input / T, target probability p and log-weight lw = 1 + (pos_weight - 1) p, all from logits:
//   BCE(z, p)         = (1 - p) z + lw * softplus(-z)                          (torch's own form)
//   KL, p given       = BCE(z, p) + p log p + (1 - p) log(1 - p)                (0 log 0 = 0)
//   KL, p = sig(u)    = (1 - p)(z - u) + softplus(-z) - softplus(-u)             (exactly 0 when z == u)
//   dL/dz             = lw * sigmoid(z) - pos_weight * p
// Every term is multiplied by the optional weight.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_math.h"

namespace kl_ext {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> softplus_neg(const Vec<T>& z, const Vec<T>& e_abs) {
  // softplus(-z) = max(-z, 0) + log1p(exp(-|z|))
  return at::vec::maximum(Vec<T>(T(0)) - z, Vec<T>(T(0))) + cpu::log1p_unit(e_abs);
}

template <typename T>
inline Vec<T> sigmoid_from(const Vec<T>& z, const Vec<T>& e_abs) {
  // e_abs = exp(-|z|): sigmoid without overflow for either sign.
  const Vec<T> one(T(1)), d = one / (one + e_abs);
  return Vec<T>::blendv(e_abs * d, d, z >= Vec<T>(T(0)));
}

// n (<= L) values at src as one vector of acc_t (the rest 0). 16-bit values are widened in registers: a staging
// pass over the row made the bf16 forward slower than fp32's.
template <typename acc_t, typename src_t>
inline Vec<acc_t> load_acc(const src_t* src, int64_t n) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    return Vec<acc_t>::loadu(src, n);
  } else {
    if (n == Vec<acc_t>::size()) {
      Vec<acc_t> v;
      at::vec::load_to_float(src, v);
      return v;
    }
    acc_t part[Vec<acc_t>::size()] = {};
    for (int64_t i = 0; i < n; ++i) part[i] = static_cast<acc_t>(src[i]);
    return Vec<acc_t>::loadu(part);
  }
}

// A streaming read prefetched 1 KiB ahead: on a 2-core Intel VM the hardware prefetchers left this loop waiting
// on its loads (the BCE forward ran 2.7x faster with it; BENCHMARKS.md). Past a row's end it is a hint, never a
// fault.
template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 1024);
}

// p log p from log p, 0 where p = 0.
template <typename T>
inline Vec<T> xlogx(const Vec<T>& p, const Vec<T>& log_p) {
  return Vec<T>::blendv(Vec<T>(T(0)), p * log_p, p > Vec<T>(T(0)));
}

// Which loss a kernel instance computes: compiled separately so the BCE loop does no work for the others.
enum class Form { kTargetLogits, kProbsKL, kBCE };

template <Form form, typename scalar_t, typename target_t>
void bernoulli_rows_cpu(const scalar_t* x, const target_t* t, RowLayout rx, RowLayout rt,
                        const at::opmath_type<scalar_t>* w, int64_t w_numel, const at::opmath_type<scalar_t>* pw,
                        int64_t pw_numel, at::opmath_type<scalar_t>* loss, bool elementwise, scalar_t* gx,
                        target_t* gt, int64_t N, int64_t C, double temperature, at::opmath_type<scalar_t> gs) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = (C + L - 1) / L * L;
  const acc_t inv_t = acc_t(1.0 / temperature);
  const acc_t gx_f = inv_t * gs;  // d/d input = (1/T) d/dz, times the reduction's grad_scale
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    // Rows are read in place (load_acc); 16-bit gradients go through per-thread staging (gx, gt).
    std::vector<acc_t> buf(2 * np, acc_t(0));
    acc_t *gxb = buf.data(), *gtb = gxb + np;
    auto out = [&](auto* dst, acc_t* stage) -> acc_t* {
      if constexpr (std::is_same_v<std::remove_pointer_t<decltype(dst)>, acc_t>) {
        return dst;
      } else {
        return stage;
      }
    };
    auto flush = [&](auto* dst, const acc_t* stage) {
      if constexpr (!std::is_same_v<std::remove_pointer_t<decltype(dst)>, acc_t>) at::vec::convert(stage, dst, C);
    };
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * C;
      const scalar_t* zr = x + rx(r);
      const target_t* tr = t + rt(r);
      const acc_t* wr = w == nullptr ? nullptr : w + (w_numel == C ? 0 : off);
      const acc_t* pwr = pw == nullptr ? nullptr : pw + (pw_numel == C ? 0 : off);
      acc_t* lr = elementwise ? loss + off : nullptr;
      acc_t* gxr = gx != nullptr ? out(gx + off, gxb) : nullptr;
      acc_t* gtr = gt != nullptr ? out(gt + off, gtb) : nullptr;
      V_t vsum(0);
      // One vector at i; `partial`: the row's short last one (its other lanes load 0). Full vectors take
      // compile-time counts, so their loads and stores are single instructions, not calls.
      auto step = [&](int64_t i, auto partial) {
        const int64_t n = decltype(partial)::value ? C - i : L;
        prefetch_ahead(zr + i);
        prefetch_ahead(tr + i);
        const V_t z = load_acc<acc_t>(zr + i, n) * V_t(inv_t);
        const V_t wv = wr != nullptr ? V_t::loadu(wr + i, n) : V_t(1);
        const V_t pwv = pwr != nullptr ? V_t::loadu(pwr + i, n) : V_t(1);
        const V_t ez = (V_t(0) - z.abs()).exp_u20();
        const V_t spz = softplus_neg(z, ez);
        V_t p, l, u, log_p, log_q;  // log_p, log_q: log p and log(1 - p), the probs KL's (entropy, target gradient)
        if constexpr (form == Form::kTargetLogits) {
          u = load_acc<acc_t>(tr + i, n) * V_t(inv_t);
          const V_t eu = (V_t(0) - u.abs()).exp_u20();
          p = sigmoid_from(u, eu);
          l = (V_t(1) - p) * (z - u) + spz - softplus_neg(u, eu);
        } else {
          p = load_acc<acc_t>(tr + i, n);
          l = (V_t(1) - p) * z + (pwr != nullptr ? V_t(1) + (pwv - V_t(1)) * p : V_t(1)) * spz;
          if constexpr (form == Form::kProbsKL) {
            log_p = cpu::log_poly(p);
            log_q = cpu::log_poly(V_t(1) - p);
            l = l + xlogx(p, log_p) + xlogx(V_t(1) - p, log_q);
          }
        }
        if (wr != nullptr) l = l * wv;
        if constexpr (decltype(partial)::value) l = V_t::set(V_t(0), l, n);  // padding stays out of the sum
        vsum += l;
        if (lr != nullptr) l.store(lr + i, n);
        if (gxr != nullptr) {
          const V_t lw = pwr != nullptr ? V_t(1) + (pwv - V_t(1)) * p : V_t(1);
          (wv * (lw * sigmoid_from(z, ez) - pwv * p) * V_t(gx_f)).store(gxr + i, n);
        }
        if (gtr != nullptr) {
          V_t g;
          if constexpr (form == Form::kTargetLogits) g = V_t(0) - p * (V_t(1) - p) * (z - u) * V_t(inv_t);
          else if constexpr (form == Form::kProbsKL) g = log_p - log_q - z;
          else g = (pwv - V_t(1)) * spz - z;
          (wv * g * V_t(gs)).store(gtr + i, n);
        }
      };
      int64_t i = 0;
      for (; i + L <= C; i += L) step(i, std::false_type{});
      if (i < C) step(i, std::true_type{});
      if (!elementwise) loss[r] = at::vec::vec_reduce_all<acc_t>([](V_t& a, V_t& b) { return a + b; }, vsum);
      if (gx != nullptr) flush(gx + off, gxb);
      if (gt != nullptr) flush(gt + off, gtb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bernoulli_kl_div_with_logits_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& pos_weight, c10::string_view target_type, double temperature,
    bool subtract_entropy, bool elementwise, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale) {
  BernoulliCall call = prepare_bernoulli(input, target, weight, pos_weight, target_type, temperature,
                                         subtract_entropy, elementwise, grad_input, grad_target, grad_scale);
  const int64_t N = num_rows(input), C = input.size(-1);
  at::Tensor &loss = call.loss, &gx = call.gx, &gt = call.gt;
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto xv, auto tv) {
    using scalar_t = decltype(xv);
    using target_t = decltype(tv);
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto form) {
      bernoulli_rows_cpu<decltype(form)::value, scalar_t, target_t>(
          input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), row_layout(input),
          row_layout(target), weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr,
          weight.has_value() ? weight->numel() : 0,
          pos_weight.has_value() ? pos_weight->const_data_ptr<acc_t>() : nullptr,
          pos_weight.has_value() ? pos_weight->numel() : 0, loss.mutable_data_ptr<acc_t>(), elementwise,
          grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr,
          grad_target ? gt.mutable_data_ptr<target_t>() : nullptr, N, C, temperature,
          grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1));
    };
    if (call.target_logits) {
      run(std::integral_constant<Form, Form::kTargetLogits>{});
    } else if (subtract_entropy) {
      run(std::integral_constant<Form, Form::kProbsKL>{});
    } else {
      run(std::integral_constant<Form, Form::kBCE>{});
    }
  });
  return {loss, gx, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) {
  m.impl("bernoulli_kl_div_with_logits_fwd", &bernoulli_kl_div_with_logits_fwd_cpu);
}

}  // namespace kl_ext
