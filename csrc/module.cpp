// The Python module kl_ext._C: the eager backward node and, when built, the CUDA kernels. Importing it loads the
// CPU kernels too: one of kl_ext._cpu_<capability> (csrc/cpu_module.cpp), chosen for this CPU by kl_ext/_cpu.py.
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

namespace kl_ext {
void attach_fused_backward(const at::Tensor& out, const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& gx, const std::optional<at::Tensor>& gt,
                           const std::string& scale_grad_op, const pybind11::object& rerun, std::string name);
at::Tensor reduce_rows(const at::Tensor& loss, const std::optional<at::Tensor>& scale);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kl_ext native ops (registered in torch.ops.kl_ext)";
  m.def("attach_fused_backward", &kl_ext::attach_fused_backward, "kl_ext/_fused.py apply: the eager backward node");
  m.def("reduce_rows", &kl_ext::reduce_rows, "kl_ext/_fused.py _reduce: the eager path's reduced loss");
  // The CPU kernels' module: its registrations run now, with the schemas every backend's ops share.
  const pybind11::object cpu = pybind11::module_::import("kl_ext._cpu").attr("load")();
  m.attr("cpu_kernels") = cpu;
  m.attr("cpu_capability") = cpu.attr("capability");  // "default", "avx2" or "avx512": what runs
  m.attr("openmp") = cpu.attr("openmp");              // whether the CPU kernels' at::parallel_for uses threads
  m.attr("cpu_math") = cpu.attr("cpu_math");
}
