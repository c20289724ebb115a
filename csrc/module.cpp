// The Python module kl_ext._C: importing it runs the TORCH_LIBRARY registrations of every op.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "kl_ext native ops (registered in torch.ops.kl_ext)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
