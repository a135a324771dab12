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
  // Gate-scatter / gate-gather of the skipping layers (csrc/{cpu,cuda}/gate_scatter.*): z_sel and t
  // are [N, K, *spatial] (contiguous or 4-D channels_last; the output keeps the format), sel int64 [A],
  // gate_sel [A] float32 (float64 for float64 data). gate_scatter: y [N, channels, *spatial] with
  // y[:, sel[a]] = z_sel[:, a] * gate_sel[a] and zeros elsewhere; gate_gather: t[:, sel[a]] * gate_sel[a].
  m.def("gate_scatter_kernel(Tensor z_sel, Tensor sel, Tensor gate_sel, int channels) -> Tensor");
  m.def("gate_gather_kernel(Tensor t, Tensor sel, Tensor gate_sel) -> Tensor");
}
