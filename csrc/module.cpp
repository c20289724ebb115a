// The Python module kl_ext._C: importing it runs the TORCH_LIBRARY registrations of every op.
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

namespace kl_ext {
void attach_fused_backward(const at::Tensor& out, const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& gx, const std::optional<at::Tensor>& gt,
                           const std::string& scale_grad_op, const pybind11::object& rerun, std::string name);
at::Tensor reduce_rows(const at::Tensor& loss, const std::optional<at::Tensor>& scale);
at::Tensor cpu_math(const at::Tensor& x, const std::string& fn);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kl_ext native ops (registered in torch.ops.kl_ext)";
  // Which CPU kernels were compiled (setup.py: portable by default, KL_EXT_AVX2=1 for AVX2).
#ifdef CPU_CAPABILITY_AVX2
  m.attr("cpu_capability") = "avx2";
#else
  m.attr("cpu_capability") = "default";
#endif
  // Whether the CPU kernels' at::parallel_for runs on threads (setup.py builds with -fopenmp on Linux).
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("attach_fused_backward", &kl_ext::attach_fused_backward, "kl_ext/_fused.py apply: the eager backward node");
  m.def("reduce_rows", &kl_ext::reduce_rows, "kl_ext/_fused.py _reduce: the eager path's reduced loss");
  m.def("cpu_math", &kl_ext::cpu_math, "the CPU kernels' inline math (csrc/cpu_math.h), for tests");
}
