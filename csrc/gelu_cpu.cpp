// CPU implementation of bias_gelu_fast and its backward, with the arithmetic of gelu.h.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "gelu.h"
#include "gelu_op.h"

namespace vivit_kernels {
namespace {

at::Tensor bias_gelu_fast_cpu(const at::Tensor& x_in, const at::Tensor& bias_in) {
  check_bias_gelu(x_in, bias_in, "bias_gelu_fast");
  const at::Tensor x = x_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel(), width = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fast_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = static_cast<scalar_t>(gelu_fast(static_cast<float>(xp[i]) + static_cast<float>(bp[i % width])));
      }
    });
  });
  return out;
}

at::Tensor bias_gelu_fast_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& bias_in) {
  check_bias_gelu(x_in, bias_in, "bias_gelu_fast_backward");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "bias_gelu_fast_backward: grad must match x in shape and dtype");
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel(), width = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fast_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float h = static_cast<float>(xp[i]) + static_cast<float>(bp[i % width]);
        dp[i] = static_cast<scalar_t>(static_cast<float>(gp[i]) * gelu_fast_grad(h));
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(vivit_kernels, CPU, m) {
  m.impl("bias_gelu_fast", &bias_gelu_fast_cpu);
  m.impl("bias_gelu_fast_backward", &bias_gelu_fast_backward_cpu);
}

}  // namespace vivit_kernels
