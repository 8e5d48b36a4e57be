// The CUDA kernels of vivit_kernels' C++ ops, free of torch headers: the extension's .cu files include this,
// and so does the ahead-of-time check (tests/test_extension.py), which compiles it alone with
// `nvcc -cubin -Xptxas -v` for each architecture to read registers and spills quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../gelu.h"
#include "../preprocess.h"

namespace vivit_kernels {

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One thread per output pixel (b, t, y, x) of (B, T, 3, out_h, out_w), grid-stride, writing its 3 channels:
// each pixel computes its own source window (no shared state), as the CPU implementation computes the same
// values in two passes.
template <typename out_t>
__global__ void preprocess_video_kernel(const uint8_t* __restrict__ in, out_t* __restrict__ out, PreprocessParams p) {
  const int64_t plane = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t total = static_cast<int64_t>(p.batch) * p.frames * plane;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int x = static_cast<int>(idx % p.out_w);
    const int y = static_cast<int>((idx / p.out_w) % p.out_h);
    const int64_t bt = idx / plane;
    const int64_t b = bt / p.frames, t = bt % p.frames;
    Taps ty, tx;
    bilinear_taps(p.in_h, p.resize_h, y + p.crop_top, ty);
    bilinear_taps(p.in_w, p.resize_w, x + p.crop_left, tx);
    uint8_t rgb[3];
    resample_pixel_rgb(in + b * p.stride_b + t * p.stride_t, p.stride_h, p.stride_w, p.stride_c, ty, tx, rgb);
    out_t* dst = out + bt * 3 * plane + static_cast<int64_t>(y) * p.out_w + x;
    for (int c = 0; c < 3; ++c) {
      if constexpr (std::is_same_v<out_t, uint8_t>) {  // the resized values themselves
        dst[c * plane] = rgb[c];
      } else {
        dst[c * plane] = from_float<out_t>(normalize_value(rgb[c], p.scale, p.offset, p.mean[c], p.inv_std[c]));
      }
    }
  }
}

// gelu_fast(x + bias) over contiguous x (n elements, rows of `width`)
template <typename T>
__global__ void bias_gelu_fast_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                                      int64_t n, int64_t width) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(gelu_fast(to_float(x[i]) + to_float(bias[i % width])));
  }
}

// grad * gelu_fast'(x + bias)
template <typename T>
__global__ void bias_gelu_fast_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                               const T* __restrict__ bias, T* __restrict__ dx, int64_t n,
                                               int64_t width) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dx[i] = from_float<T>(to_float(grad[i]) * gelu_fast_grad(to_float(x[i]) + to_float(bias[i % width])));
  }
}

}  // namespace vivit_kernels
