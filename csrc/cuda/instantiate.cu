// Explicit instantiations of every kernel in kernels.cuh, for the ahead-of-time register / spill check
// (tests/test_extension.py compiles this file alone; the extension instantiates the same templates).
#include "kernels.cuh"

namespace vivit_kernels {
template __global__ void preprocess_video_kernel<float>(const uint8_t*, float*, PreprocessParams);
template __global__ void preprocess_video_kernel<__half>(const uint8_t*, __half*, PreprocessParams);
template __global__ void preprocess_video_kernel<__nv_bfloat16>(const uint8_t*, __nv_bfloat16*, PreprocessParams);
template __global__ void preprocess_video_kernel<uint8_t>(const uint8_t*, uint8_t*, PreprocessParams);
#define VK_GELU(T)                                                                                         \
  template __global__ void bias_gelu_fast_kernel<T>(const T*, const T*, T*, int64_t, int64_t);            \
  template __global__ void bias_gelu_fast_backward_kernel<T>(const T*, const T*, const T*, T*, int64_t, int64_t);
VK_GELU(float)
VK_GELU(__half)
VK_GELU(__nv_bfloat16)
#undef VK_GELU
}  // namespace vivit_kernels
