// The backward of every kl_ext loss in eager mode (kl_ext/_fused.py, apply): a C++ autograd node over the
// gradients the fused forward already computed. It does what the losses' autograd.Function backward does
// (_fused_backward: scale the saved gradients in place by grad_output with the backend's scale_grad_, once
// differentiable, a second backward through a retained graph recomputes them) without entering Python, and
// the forward skips autograd.Function.apply: together ~100 µs per call on small losses (BENCHMARKS.md,
// per-call overhead). torch.compile traces the autograd.Function instead.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

namespace kl_ext {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// "kl_ext::scale_grad_" or "kl_ext_triton::scale_grad_", looked up once.
const c10::OperatorHandle& scale_op(const std::string& name) {
  static std::mutex mutex;
  static std::unordered_map<std::string, c10::OperatorHandle> ops;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = ops.find(name);
  if (it == ops.end()) it = ops.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "")).first;
  return it->second;
}

struct FusedLossBackward : Node {
  FusedLossBackward(std::string name, const c10::OperatorHandle& scale, PyObject* rerun)
      : name_(std::move(name)), scale_(scale), rerun_(rerun) {
    Py_INCREF(rerun_);
  }

  ~FusedLossBackward() override { drop_rerun(); }

  std::string name() const override { return name_; }

  variable_list apply(variable_list&& grad_outputs) override {
    const at::Tensor& grad_out = grad_outputs[0];
    variable_list out(2);
    if (!grad_out.defined()) return out;  // no gradient flows: zero
    at::Tensor grads[2];
    if (!scaled_) {
      for (int i = 0; i < 2; ++i) grads[i] = saved_[i].unpack();
    } else {
      recompute(grads);  // the saved ones were scaled in place by the first backward
    }
    scaled_ = true;
    // A reduced loss's grad_output is 0-d: scale_grad_ takes it as it is (no view to make per call).
    const at::Tensor scale = grad_out.dim() == 0 ? grad_out : grad_out.reshape(-1).contiguous();
    for (int i = 0; i < 2; ++i) {
      if (!should_compute_output(i) || !grads[i].defined()) continue;
      const auto acc = grads[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      scale_.typed<void(at::Tensor&, const at::Tensor&)>().call(grads[i], scale.to(acc));
      out[i] = grads[i].sizes() == shapes_[i] ? grads[i] : grads[i].reshape(shapes_[i]);
    }
    // create_graph=True: the kernels give no second derivatives. Refused at once (as kl_ext._fused.kernel_backward
    // does for the compiled path), not left to fail, or silently give nothing, when the gradient is differentiated.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "kl_ext: a backward with create_graph=True (double backward, e.g. a gradient penalty) needs second "
                "derivatives, which the kernel backends do not give; compute this loss with backend='torch' (the "
                "differentiable reference) for it");
    return out;
  }

  void release_variables() override {
    for (auto& s : saved_) s.reset_data();
    drop_rerun();
  }

  SavedVariable saved_[2];
  std::vector<int64_t> shapes_[2];

 private:
  void recompute(at::Tensor* grads) {
    TORCH_CHECK(rerun_ != nullptr, "kl_ext: this loss's graph was freed by an earlier backward; pass "
                                   "retain_graph=True to the first one");
    pybind11::gil_scoped_acquire gil;
    PyObject* res = PyObject_CallNoArgs(rerun_);
    if (res == nullptr) {
      python_error err;
      err.persist();
      throw err;
    }
    for (int i = 0; i < 2; ++i) {
      PyObject* g = PyTuple_GET_ITEM(res, i);
      grads[i] = g == Py_None ? at::Tensor() : THPVariable_Unpack(g);
    }
    Py_DECREF(res);
  }

  void drop_rerun() {
    if (rerun_ == nullptr) return;
    if (Py_IsInitialized()) {
      pybind11::gil_scoped_acquire gil;
      Py_DECREF(rerun_);
    }
    rerun_ = nullptr;
  }

  std::string name_;
  const c10::OperatorHandle& scale_;
  PyObject* rerun_;
  bool scaled_ = false;
};

// torch < 2.13 holds autograd nodes in std::shared_ptr, deleted through deleteNode (iteratively, so freeing a
// long graph does not recurse); later releases in c10::intrusive_ptr. N is a template parameter so that only
// the branch of the torch being built against is compiled (deleteNode is found by argument-dependent lookup).
template <typename N, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  } else {
    return std::shared_ptr<N>(new N(std::forward<Args>(args)...), [](N* node) { deleteNode(node); });
  }
}

}  // namespace

// Make `out` (computed without autograd) the output of a FusedLossBackward node whose gradients for input and
// target are gx and gt (None where not wanted) times grad_output. rerun() returns (gx, gt) again, unscaled.
void attach_fused_backward(const at::Tensor& out, const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& gx, const std::optional<at::Tensor>& gt,
                           const std::string& scale_grad_op, const pybind11::object& rerun, std::string name) {
  auto node = make_node<FusedLossBackward>(std::move(name), scale_op(scale_grad_op), rerun.ptr());
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  node->saved_[0] = SavedVariable(gx, false);
  node->saved_[1] = SavedVariable(gt, false);
  node->shapes_[0] = input.sizes().vec();
  node->shapes_[1] = target.sizes().vec();
  torch::autograd::set_history(out, node);
}

// The eager path's reduced loss: the per-row losses summed, times the reduction's 1 / denominator (scale, 0-d,
// the loss's dtype) when given. Small CPU losses are summed here in a double loop: sum() and mul_() through the
// dispatcher cost ~15 µs on an 8 x 1000 loss (2026-11-23), as much as its kernel.
at::Tensor reduce_rows(const at::Tensor& loss, const std::optional<at::Tensor>& scale) {
  constexpr int64_t kLoopRows = 1 << 16;  // beyond: ATen's vectorized, threaded sum
  const bool loop = loss.device().is_cpu() && loss.dim() == 1 && loss.numel() <= kLoopRows &&
                    loss.is_contiguous() && !loss.requires_grad() &&
                    (!scale || (scale->device().is_cpu() && scale->scalar_type() == loss.scalar_type()));
  if (!loop) return scale ? loss.sum().mul_(*scale) : loss.sum();
  at::Tensor out = at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "reduce_rows", [&] {
    const scalar_t* l = loss.const_data_ptr<scalar_t>();
    const int64_t n = loss.numel();
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += l[i];
    if (scale) sum *= *scale->const_data_ptr<scalar_t>();
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum);
  });
  return out;
}

}  // namespace kl_ext
