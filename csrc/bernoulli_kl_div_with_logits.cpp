// bernoulli_kl_div_with_logits: op schema + CPU kernel. One elementwise kernel family serves both the
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

namespace kl_ext {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> softplus_neg(const Vec<T>& z, const Vec<T>& e_abs) {
  // softplus(-z) = max(-z, 0) + log1p(exp(-|z|))
  return at::vec::maximum(Vec<T>(T(0)) - z, Vec<T>(T(0))) + e_abs.log1p();
}

template <typename T>
inline Vec<T> sigmoid_from(const Vec<T>& z, const Vec<T>& e_abs) {
  // e_abs = exp(-|z|): sigmoid without overflow for either sign.
  const Vec<T> one(T(1)), d = one / (one + e_abs);
  return Vec<T>::blendv(e_abs * d, d, z >= Vec<T>(T(0)));
}

template <typename T>
inline Vec<T> xlogx(const Vec<T>& p) {
  return Vec<T>::blendv(Vec<T>(T(0)), p * p.log(), p > Vec<T>(T(0)));
}

template <typename scalar_t, typename target_t>
void bernoulli_rows_cpu(const scalar_t* x, const target_t* t, RowLayout rx, RowLayout rt,
                        const at::opmath_type<scalar_t>* w, int64_t w_numel, const at::opmath_type<scalar_t>* pw,
                        int64_t pw_numel, at::opmath_type<scalar_t>* loss, bool elementwise, scalar_t* gx,
                        target_t* gt, int64_t N,
                        int64_t C, bool target_logits, double temperature, bool subtract_entropy,
                        at::opmath_type<scalar_t> gs) {
  using acc_t = at::opmath_type<scalar_t>;
  using V_t = Vec<acc_t>;
  constexpr int64_t L = V_t::size();
  const int64_t np = (C + L - 1) / L * L;
  const acc_t inv_t = acc_t(1.0 / temperature);
  const acc_t gx_f = inv_t * gs;  // d/d input = (1/T) d/dz, times the reduction's grad_scale
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    // Rows of acc_t are read and written in place; 16-bit rows go through per-thread staging (x, t, gx, gt).
    std::vector<acc_t> buf(4 * np, acc_t(0));
    acc_t *xb = buf.data(), *tb = xb + np, *gxb = tb + np, *gtb = gxb + np;
    auto in = [&](const auto* src, acc_t* stage) -> const acc_t* {
      if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(src)>>, acc_t>) {
        return src;
      } else {
        at::vec::convert(src, stage, C);
        return stage;
      }
    };
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
      const acc_t* zr = in(x + rx(r), xb);
      const acc_t* tr = in(t + rt(r), tb);
      const acc_t* wr = w == nullptr ? nullptr : w + (w_numel == C ? 0 : off);
      const acc_t* pwr = pw == nullptr ? nullptr : pw + (pw_numel == C ? 0 : off);
      acc_t* lr = elementwise ? loss + off : nullptr;
      acc_t* gxr = gx != nullptr ? out(gx + off, gxb) : nullptr;
      acc_t* gtr = gt != nullptr ? out(gt + off, gtb) : nullptr;
      V_t vsum(0);
      for (int64_t i = 0; i < C; i += L) {
        const int64_t n = std::min<int64_t>(L, C - i);  // a short last vector: its other lanes load 0
        const V_t z = V_t::loadu(zr + i, n) * V_t(inv_t);
        const V_t wv = wr != nullptr ? V_t::loadu(wr + i, n) : V_t(1);
        const V_t pwv = pwr != nullptr ? V_t::loadu(pwr + i, n) : V_t(1);
        const V_t ez = (V_t(0) - z.abs()).exp_u20();
        const V_t spz = softplus_neg(z, ez);
        V_t p, l, u;
        if (target_logits) {
          u = V_t::loadu(tr + i, n) * V_t(inv_t);
          const V_t eu = (V_t(0) - u.abs()).exp_u20();
          p = sigmoid_from(u, eu);
          l = (V_t(1) - p) * (z - u) + spz - softplus_neg(u, eu);
        } else {
          p = V_t::loadu(tr + i, n);
          l = (V_t(1) - p) * z + (pwr != nullptr ? V_t(1) + (pwv - V_t(1)) * p : V_t(1)) * spz;
          if (subtract_entropy) l = l + xlogx(p) + xlogx(V_t(1) - p);
        }
        if (wr != nullptr) l = l * wv;
        if (n < L) l = V_t::set(V_t(0), l, n);  // keep the padding out of the row sum
        vsum += l;
        if (lr != nullptr) l.store(lr + i, n);
        if (gxr != nullptr) {
          const V_t lw = pwr != nullptr ? V_t(1) + (pwv - V_t(1)) * p : V_t(1);
          (wv * (lw * sigmoid_from(z, ez) - pwv * p) * V_t(gx_f)).store(gxr + i, n);
        }
        if (gtr != nullptr) {
          V_t g;
          if (target_logits) g = V_t(0) - p * (V_t(1) - p) * (z - u) * V_t(inv_t);
          else if (subtract_entropy) g = p.log() - (V_t(1) - p).log() - z;
          else g = (pwv - V_t(1)) * spz - z;
          (wv * g * V_t(gs)).store(gtr + i, n);
        }
      }
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
    bernoulli_rows_cpu<scalar_t, target_t>(
        input.const_data_ptr<scalar_t>(), target.const_data_ptr<target_t>(), row_layout(input), row_layout(target),
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, weight.has_value() ? weight->numel() : 0,
        pos_weight.has_value() ? pos_weight->const_data_ptr<acc_t>() : nullptr,
        pos_weight.has_value() ? pos_weight->numel() : 0, loss.mutable_data_ptr<acc_t>(), elementwise,
        grad_input ? gx.mutable_data_ptr<scalar_t>() : nullptr, grad_target ? gt.mutable_data_ptr<target_t>() : nullptr,
        N, C, call.target_logits, temperature, subtract_entropy,
        grad_scale.has_value() ? *grad_scale->const_data_ptr<acc_t>() : acc_t(1));
  });
  return {loss, gx, gt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kl_ext, m) {
  // Elementwise (rows, C) loss (accumulation dtype) when `elementwise`, else per-row sums (rows,); gradients of
  // the summed loss w.r.t. input / target times grad_scale (0-dim, accumulation dtype) when asked (empty
  // otherwise). weight / pos_weight: accumulation dtype, per class or per element. subtract_entropy=false is
  // binary cross-entropy with logits.
  m.def(
      "bernoulli_kl_div_with_logits_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "str target_type, float temperature, bool subtract_entropy, bool elementwise, bool grad_input, "
      "bool grad_target, Tensor? grad_scale=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kl_ext, CPU, m) {
  m.impl("bernoulli_kl_div_with_logits_fwd", &bernoulli_kl_div_with_logits_fwd_cpu);
}

}  // namespace kl_ext
