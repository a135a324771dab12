// Operator schemas of the tg_kernels extension and the Python module that loads them.
//
// Importing `tg_kernels._C` runs the static initialisers below, which register the schemas;
// csrc/cpu/*.cpp and csrc/cuda/*.cu register their kernels for the CPU and CUDA dispatch keys.
// Kernel ops take canonical layouts (see each schema); the Python layer in tg_kernels/ops/ maps
// user layouts onto them, validates arguments and adds autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no methods: importing it loads this shared library and so runs TORCH_LIBRARY.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "WITH_CUDA", TG_KERNELS_WITH_CUDA);
  }
  return module;
}
}

TORCH_LIBRARY(tg_kernels, m) {
  // Channel gate on the canonical view x: [outer, C, inner], contiguous; gate: [C] float32
  // (float64 when x is float64). y = x * gate[c].
  m.def("channel_gate_forward_kernel(Tensor x, Tensor gate) -> Tensor");
  // Returns (grad_x, grad_gate): grad_x = grad_y * gate[c] in x's dtype, and
  // grad_gate[c] = sum over outer and inner of grad_y * x, accumulated in gate's dtype (at least
  // float32) in an order fixed by the shapes alone, so results are bitwise reproducible.
  m.def("channel_gate_backward_kernel(Tensor grad_y, Tensor x, Tensor gate) -> (Tensor, Tensor)");
}
