// Schemas of the vivit_kernels C++/CUDA ops. Implementations: preprocess_cpu.cpp / gelu_cpu.cpp (CPU) and
// cuda/*.cu (CUDA). Python calls them as torch.ops.vivit_kernels.<op> through vivit_kernels/ops/*.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vivit_kernels._C` loads this library (and with it the registrations below). Its only Python API is
// `cuda_skipped_on_request`: 1 when setup.py left the CUDA kernels out because VIVIT_KERNELS_SKIP_CUDA_BUILD
// asked it to (so the tests can tell a deliberate CPU-only build from a CUDA build that went missing).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef VIVIT_KERNELS_CUDA_SKIPPED
  const long skipped = 1;
#else
  const long skipped = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "cuda_skipped_on_request", skipped) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(vivit_kernels, m) {
  // uint8 frames (B, T, H, W, 3) -> (B, T, 3, crop_h, crop_w): bilinear resize to resize_hw (Pillow's
  // arithmetic, antialiased when shrinking), the crop [top, left, height, width], x * scale + offset,
  // then (x - mean) / std per channel.
  m.def("preprocess_video(Tensor frames, int[] resize_hw, int[] crop_box, float scale, float offset, "
        "float[] mean, float[] std, ScalarType dtype) -> Tensor");
  // gelu_fast(x + bias), bias broadcast over the last dimension
  m.def("bias_gelu_fast(Tensor x, Tensor bias) -> Tensor");
  // grad * gelu_fast'(x + bias): the gradient of x (the bias gradient is its sum over the leading dims)
  m.def("bias_gelu_fast_backward(Tensor grad, Tensor x, Tensor bias) -> Tensor");
}
