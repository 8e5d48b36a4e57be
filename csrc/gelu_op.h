// Host-side argument checking for bias_gelu_fast, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

namespace vivit_kernels {

inline void check_bias_gelu(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1), op, ": bias must be (",
              x.dim() ? x.size(-1) : 0, ",) to match x's last dimension, got x ", x.sizes(), " and bias ", bias.sizes());
  TORCH_CHECK(x.scalar_type() == bias.scalar_type(), op, ": x is ", x.scalar_type(), ", bias is ",
              bias.scalar_type(), "; they must match");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": supports float32, float16 and bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device() == bias.device(), op, ": x is on ", x.device(), ", bias on ", bias.device());
}

}  // namespace vivit_kernels
