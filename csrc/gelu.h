// gelu_fast (transformers' FastGELUActivation) and its derivative, shared by the CUDA kernels and the CPU
// implementation. Arithmetic in float32.
#pragma once

#include <cmath>

#include "host_device.h"

namespace vivit_kernels {

// 0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2)))
VK_HOST_DEVICE float gelu_fast(float x) {
  const float t = tanhf(x * 0.7978845608f * (1.0f + 0.044715f * x * x));
  return 0.5f * x * (1.0f + t);
}

// d/dx gelu_fast(x)
VK_HOST_DEVICE float gelu_fast_grad(float x) {
  const float t = tanhf(x * 0.7978845608f * (1.0f + 0.044715f * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.7978845608f * (1.0f + 3.0f * 0.044715f * x * x);
}

}  // namespace vivit_kernels
