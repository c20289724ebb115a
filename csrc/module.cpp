// The Python module kl_ext._C: importing it runs the TORCH_LIBRARY registrations of every op.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "kl_ext native ops (registered in torch.ops.kl_ext)", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  // Which CPU kernels were compiled (setup.py: portable by default, KL_EXT_AVX2=1 for AVX2).
#ifdef CPU_CAPABILITY_AVX2
  const char* capability = "avx2";
#else
  const char* capability = "default";
#endif
  // Whether the CPU kernels' at::parallel_for runs on threads (setup.py builds with -fopenmp on Linux).
#ifdef _OPENMP
  const long openmp = 1;
#else
  const long openmp = 0;
#endif
  if (m != nullptr && (PyModule_AddStringConstant(m, "cpu_capability", capability) != 0 ||
                       PyModule_AddObject(m, "openmp", PyBool_FromLong(openmp)) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
