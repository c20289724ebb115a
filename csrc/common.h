// Shared by the CPU and CUDA implementations: option parsing and the checks every kernel relies on.
// User-facing validation (with messages that say what to do) happens once, in kl_ext/_validation.py;
// these TORCH_CHECKs only guard direct calls to the raw ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <algorithm>
#include <cstdint>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "divergences.h"

namespace kl_ext {

enum class TargetType { Logits, LogProbs, Probs };
enum class Direction { Forward, Reverse };

inline TargetType parse_target_type(const std::string& s) {
  if (s == "logits") return TargetType::Logits;
  if (s == "log_probs") return TargetType::LogProbs;
  if (s == "probs") return TargetType::Probs;
  TORCH_CHECK(false, "kl_ext: target_type must be 'logits', 'log_probs' or 'probs', got '", s, "'");
}

inline Direction parse_direction(const std::string& s) {
  if (s == "forward") return Direction::Forward;
  if (s == "reverse") return Direction::Reverse;
  TORCH_CHECK(false, "kl_ext: direction must be 'forward' or 'reverse', got '", s, "'");
}

// Rows are read in place through int64 strides: a row tensor is (rows, V) or (A, B, V) (rows = A * B) with unit
// stride over its last dim and any strides over the others (shifted slices, expanded or transposed leading dims;
// kl_ext/_fused.py `_rows` makes that view of any input). Losses and gradients are written contiguous.
struct RowLayout {
  int64_t inner, s0, s1;  // row r starts at (r / inner) * s0 + (r % inner) * s1
  C10_HOST_DEVICE int64_t operator()(int64_t r) const {
    return inner == 1 ? r * s0 : (r / inner) * s0 + (r % inner) * s1;
  }
  // Every row starts a multiple of n elements after the first (the CUDA kernels' 16-byte packs).
  bool steps_of(int64_t n) const { return s0 % n == 0 && (inner == 1 || s1 % n == 0); }
};

inline int64_t num_rows(const at::Tensor& t) { return t.dim() == 2 ? t.size(0) : t.size(0) * t.size(1); }

inline RowLayout row_layout(const at::Tensor& t) {
  if (t.dim() == 2) return {1, t.stride(0), 0};
  return {std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1)};
}

inline void check_row_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && (t.size(-1) <= 1 || t.stride(-1) == 1), "kl_ext: ", name,
              " must be (rows, V) or (A, B, V) with unit stride over V");
}

// An output the kernel fills: a large one on the CPU is freshly mapped memory each call (glibc maps big blocks,
// torch's CPU allocator keeps none), so the kernel's first writes fault once per 4 KiB page: over a quarter of a
// large KL training step's time on a 2-core VM. Asking for transparent
// huge pages before the first write makes that a fault per 2 MiB, as torch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1. A hint: nothing changes where THP is off, and the memory stays torch's to free.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (t.is_cpu() && t.nbytes() >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// A row tensor's gradient: contiguous (rows, V), or empty when not wanted.
inline at::Tensor grad_like(const at::Tensor& t, bool wanted) {
  return wanted ? empty_output({num_rows(t), t.size(-1)}, t.options()) : at::empty({0}, t.options());
}

// The input / target dtype pairs the kernels read in place: one dtype (float32, float64, bfloat16, float16), or
// a 16-bit one with float32 in either order (mixed precision). kl_ext/_validation.py says the same to users.
inline bool dtype_pair_supported(at::ScalarType x, at::ScalarType t) {
  const auto half = [](at::ScalarType d) { return d == at::kBFloat16 || d == at::kHalf; };
  return x == t || (x == at::kFloat && half(t)) || (half(x) && t == at::kFloat);
}

inline void check_rows(const at::Tensor& input, const at::Tensor& target) {
  check_row_tensor(input, "input");
  check_row_tensor(target, "target");
  TORCH_CHECK(num_rows(target) == num_rows(input) && target.size(-1) == input.size(-1),
              "kl_ext: target must have the input's rows and classes");
  TORCH_CHECK(dtype_pair_supported(input.scalar_type(), target.scalar_type()),
              "kl_ext: input and target must have one dtype, or be a 16-bit dtype and float32");
  TORCH_CHECK(target.device() == input.device(), "kl_ext: input and target are on different devices");
}

// f(x, t) with default-constructed values of the input's and the target's C++ types, for a supported pair
// (dtype_pair_supported): each tensor is read in its own dtype, so a mixed-precision call makes no casting pass.
// KL_EXT_TWO_PAIRS: float32 and bfloat16 rows only (their two pack widths), other dtypes an error. For the
// sanitizer builds of the emulated kernels (tests/conftest.py, build_emulator): they compile in a third of the time.
template <typename F>
void dispatch_pair(at::ScalarType x, at::ScalarType t, const F& f) {
#ifdef KL_EXT_TWO_PAIRS
  TORCH_CHECK(x == t && (x == at::kFloat || x == at::kBFloat16),
              "kl_ext: this build (KL_EXT_TWO_PAIRS) takes float32 and bfloat16 rows only");
  x == at::kFloat ? f(float(), float()) : f(c10::BFloat16(), c10::BFloat16());
#else
  if (x == t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x, "kl_ext", [&] { f(scalar_t(), scalar_t()); });
  } else if (x == at::kFloat) {
    t == at::kBFloat16 ? f(float(), c10::BFloat16()) : f(float(), c10::Half());
  } else {
    x == at::kBFloat16 ? f(c10::BFloat16(), float()) : f(c10::Half(), float());
  }
#endif
}

// Losses, weights and gradient scales are in the accumulation dtype: float64 for float64 inputs (so the
// float64 gradcheck sees float64 losses), float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Optional per-class (numel == classes) or per-element (numel == rows*classes) factor in acc_type.
inline void check_factor(const c10::optional<at::Tensor>& f, const at::Tensor& input, const char* name) {
  if (!f.has_value()) return;
  TORCH_CHECK(f->scalar_type() == acc_type(input.scalar_type()) && f->is_contiguous() &&
                  f->device() == input.device(),
              "kl_ext: ", name, " must be a contiguous tensor of the accumulation dtype on the input's device");
  TORCH_CHECK(f->numel() == input.size(-1) || f->numel() == input.numel(),
              "kl_ext: ", name, " must have one value per class or per element");
}

// scale_grad's operands: a 2-D contiguous gradient, and 1, rows or rows*V scale values in the accumulation dtype.
inline void check_scale(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "kl_ext: scale_grad expects a 2-D contiguous gradient");
  TORCH_CHECK(scale.scalar_type() == acc_type(grad.scalar_type()) && scale.is_contiguous() &&
                  scale.device() == grad.device(),
              "kl_ext: scale must be a contiguous tensor of the accumulation dtype on the gradient's device");
  const int64_t sn = scale.numel(), N = grad.size(0);
  TORCH_CHECK(sn == 1 || sn == N || sn == N * grad.size(1), "kl_ext: scale must hold 1, rows or rows*V values");
}

// The forward ops' optional gradient multiplier: one accumulation-dtype value on the input's device.
inline void check_grad_scale(const c10::optional<at::Tensor>& g, const at::Tensor& input) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->numel() == 1 && g->scalar_type() == acc_type(input.scalar_type()) && g->device() == input.device(),
              "kl_ext: grad_scale must be one value of the accumulation dtype on the input's device");
}

// The row losses' optional mask: one bool per row.
inline void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& input) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == num_rows(input) && mask->is_contiguous() &&
                  mask->device() == input.device(),
              "kl_ext: mask must be a contiguous bool tensor with one value per row, on the input's device");
}

// A kl_div_with_logits_fwd / divergence_with_logits_fwd call after its checks: parsed options and the outputs
// every backend fills (direction: forward for the divergences; divergence and param: theirs, unused by the KL).
//
// Vocabulary-parallel modes (row_stats given; kl_ext/distributed.py): the rows are one shard of the vocabulary.
//  * row_stats (rows, 0), the statistics pass (no gradients): `shard` (rows, 3) gets the row's loss on this shard
//    alone (the KL; 0 for the divergences) and the log-masses of student and teacher on the shard: the log-sum-exp of
//    input / T and of target / T (log of their sum for probs / log-probs targets), -inf where there is none.
//  * row_stats (rows, 4) of the full rows, the finishing pass (`given`): the log-masses of student and teacher
//    and the row sums the gradients take (the KL: the row's KL; a divergence: sum q dL/dq, sum p dL/dp). The
//    kernels use them instead of the shard's own statistics; `shard` (rows, 2) gets a divergence's sums over this
//    shard (zeros for the KL, whose loss the statistics pass gives). A divergence's row loss is their sum: each
//    is 1-homogeneous in (p, q), so L = sum q dL/dq + sum p dL/dp (Euler).
// `loss` is then scratch; masked rows give zeros in `shard`.
struct KLCall {
  TargetType target_type;
  Direction direction;
  at::Tensor loss, gx, gt;
  at::Tensor shard, given;  // undefined unless row_stats was given
  bool is_divergence = false;  // divergence_with_logits_fwd's call
  Divergence divergence = Divergence::JSD;
  double param = 0;

  // What the op returns as its loss.
  const at::Tensor& out() const { return shard.defined() ? shard : loss; }
};

// The checks and outputs of the row-softmax losses' ops (kl_div_with_logits_fwd, divergence_with_logits_fwd).
inline KLCall prepare_softmax_rows(const at::Tensor& input, const at::Tensor& target,
                                   const c10::optional<at::Tensor>& mask, c10::string_view target_type,
                                   double temperature, bool grad_input, bool grad_target,
                                   const c10::optional<at::Tensor>& grad_scale,
                                   const c10::optional<at::Tensor>& row_stats) {
  check_rows(input, target);
  check_grad_scale(grad_scale, input);
  TORCH_CHECK(temperature > 0, "kl_ext: temperature must be > 0");
  const int64_t N = num_rows(input);
  check_mask(mask, input);
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  KLCall call{parse_target_type(std::string(target_type)), Direction::Forward, at::empty({N}, acc),
              grad_like(input, grad_input), grad_like(target, grad_target)};
  if (row_stats.has_value()) {
    const at::Tensor& s = *row_stats;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == N && (s.size(1) == 0 || s.size(1) == 4) && s.is_contiguous() &&
                    s.scalar_type() == acc_type(input.scalar_type()) && s.device() == input.device(),
                "kl_ext: row_stats must be a contiguous (rows, 0) or (rows, 4) tensor of the accumulation dtype "
                "on the input's device");
    const bool stats_pass = s.size(1) == 0;
    TORCH_CHECK(!stats_pass || !(grad_input || grad_target),
                "kl_ext: the statistics pass (row_stats of 0 columns) computes no gradients");
    call.shard = at::zeros({N, stats_pass ? 3 : 2}, acc);
    if (!stats_pass) call.given = s;
  }
  return call;
}

inline KLCall prepare_kl(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
                         c10::string_view target_type, double temperature, c10::string_view direction,
                         bool grad_input, bool grad_target, const c10::optional<at::Tensor>& grad_scale,
                         const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_softmax_rows(input, target, mask, target_type, temperature, grad_input, grad_target,
                                     grad_scale, row_stats);
  call.direction = parse_direction(std::string(direction));
  return call;
}

// param: JSD beta, skew alpha, both in (0, 1) (0 and 1 are the KL op's directions); unused by the TVD.
inline KLCall prepare_divergence(const at::Tensor& input, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& mask, c10::string_view target_type,
                                 double temperature, c10::string_view divergence, double param, bool grad_input,
                                 bool grad_target, const c10::optional<at::Tensor>& grad_scale,
                                 const c10::optional<at::Tensor>& row_stats) {
  const Divergence d = parse_divergence(std::string(divergence));
  TORCH_CHECK(!divergence_has_param(d) || (param > 0 && param < 1),
              "kl_ext: divergence_with_logits_fwd takes 0 < param < 1 (0 and 1 are kl_div_with_logits_fwd's "
              "directions)");
  KLCall call = prepare_softmax_rows(input, target, mask, target_type, temperature, grad_input, grad_target,
                                     grad_scale, row_stats);
  call.is_divergence = true;
  call.divergence = d;
  call.param = param;
  return call;
}

// The row-softmax ops' entries, once for every backend that registers them: checks and outputs, then
// Rows::run(call, input, target, mask, temperature, grad_scale) fills the outputs.
template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_with_logits_fwd(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view direction, bool grad_input, bool grad_target,
    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_kl(input, target, mask, target_type, temperature, direction, grad_input, grad_target,
                           grad_scale, row_stats);
  Rows::run(call, input, target, mask, temperature, grad_scale);
  return {call.out(), call.gx, call.gt};
}

template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_with_logits_fwd(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    c10::string_view target_type, double temperature, c10::string_view divergence, double param, bool grad_input,
    bool grad_target, const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& row_stats) {
  KLCall call = prepare_divergence(input, target, mask, target_type, temperature, divergence, param, grad_input,
                                   grad_target, grad_scale, row_stats);
  Rows::run(call, input, target, mask, temperature, grad_scale);
  return {call.out(), call.gx, call.gt};
}

// sparse_kl_div_with_logits_fwd after its checks: parsed options and the outputs every backend fills (gv: the
// gradient w.r.t. the k target values, in their accumulation dtype).
struct SparseCall {
  TargetType target_type;
  bool normalize;  // teacher renormalized over its support (logits, or tail "renorm"): no tail term
  at::Tensor loss, gx, gv;
};

inline SparseCall prepare_sparse(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
                                 const c10::optional<at::Tensor>& mask, c10::string_view target_type,
                                 c10::string_view tail, double temperature, bool grad_input, bool grad_target,
                                 const c10::optional<at::Tensor>& grad_scale) {
  check_row_tensor(input, "input");
  const int64_t N = num_rows(input);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == N && indices.is_contiguous() &&
                  indices.scalar_type() == at::kLong && indices.device() == input.device(),
              "kl_ext: target_indices must be contiguous int64 (rows, k) on the input's device");
  TORCH_CHECK(values.sizes() == indices.sizes() && values.is_contiguous() &&
                  values.scalar_type() == acc_type(input.scalar_type()) && values.device() == input.device(),
              "kl_ext: target_values must be contiguous (rows, k) in the accumulation dtype on the input's device");
  check_grad_scale(grad_scale, input);
  TORCH_CHECK(temperature > 0, "kl_ext: temperature must be > 0");
  TORCH_CHECK(tail == "bucket" || tail == "renorm", "kl_ext: tail must be 'bucket' or 'renorm'");
  check_mask(mask, input);
  const TargetType tt = parse_target_type(std::string(target_type));
  return {tt, tt == TargetType::Logits || tail == "renorm",
          at::empty({N}, input.options().dtype(acc_type(input.scalar_type()))),
          grad_like(input, grad_input), grad_target ? at::empty_like(values) : at::empty({0}, values.options())};
}

// The same for bernoulli_kl_div_with_logits_fwd.
struct BernoulliCall {
  bool target_logits;
  at::Tensor loss, gx, gt;
};

inline BernoulliCall prepare_bernoulli(const at::Tensor& input, const at::Tensor& target,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& pos_weight, c10::string_view target_type,
                                       double temperature, bool subtract_entropy, bool elementwise,
                                       bool grad_input, bool grad_target,
                                       const c10::optional<at::Tensor>& grad_scale) {
  check_rows(input, target);
  check_factor(weight, input, "weight");
  check_factor(pos_weight, input, "pos_weight");
  check_grad_scale(grad_scale, input);
  const TargetType tt = parse_target_type(std::string(target_type));
  TORCH_CHECK(tt != TargetType::LogProbs, "kl_ext: Bernoulli targets are 'probs' or 'logits'");
  TORCH_CHECK(temperature > 0, "kl_ext: temperature must be > 0");
  TORCH_CHECK(!(pos_weight.has_value() && (subtract_entropy || tt == TargetType::Logits)),
              "kl_ext: pos_weight is only defined for binary cross-entropy with probability targets");
  const int64_t N = num_rows(input), C = input.size(-1);
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  return {tt == TargetType::Logits, elementwise ? empty_output({N, C}, acc) : at::empty({N}, acc),
          grad_like(input, grad_input), grad_like(target, grad_target)};
}

}  // namespace kl_ext
