// The Python module kl_ext._cpu_<capability> (TORCH_EXTENSION_NAME): one build of the CPU kernels, compiled by
// setup.py once per capability with that capability's flags. Importing it runs the ops' CPU registrations
// (schemas: kl_ext/_ops.py); kl_ext/_cpu.py imports exactly one.
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace kl_ext {
at::Tensor cpu_math(const at::Tensor& x, const std::string& fn);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(CPU_CAPABILITY_AVX512)
  m.attr("capability") = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  m.attr("capability") = "avx2";
#else
  m.attr("capability") = "default";
#endif
  // Whether at::parallel_for runs on threads (setup.py builds with -fopenmp on Linux).
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("cpu_math", &kl_ext::cpu_math, "the CPU kernels' inline math (csrc/cpu_math.h), for tests");
}
