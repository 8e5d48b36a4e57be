// CUDA implementation of bias_gelu_fast and its backward (the gelu_fast derivative kernel).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gelu_op.h"
#include "arch_check.h"
#include "kernels.cuh"

namespace vivit_kernels {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::Tensor bias_gelu_fast_cuda(const at::Tensor& x_in, const at::Tensor& bias_in) {
  check_bias_gelu(x_in, bias_in, "bias_gelu_fast");
  TORCH_CHECK(x_in.is_cuda(), "bias_gelu_fast_cuda: x must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_kernel_image(bias_gelu_fast_kernel<float>, "bias_gelu_fast", x_in.get_device());
  const at::Tensor x = x_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel(), width = x.size(-1);
  if (n == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat:
      bias_gelu_fast_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(ptr<float>(x), ptr<float>(bias), ptr<float>(out), n, width);
      break;
    case at::kHalf:
      bias_gelu_fast_kernel<__half><<<blocks_for(n), kThreads, 0, stream>>>(ptr<__half>(x), ptr<__half>(bias), ptr<__half>(out), n, width);
      break;
    default:
      bias_gelu_fast_kernel<__nv_bfloat16><<<blocks_for(n), kThreads, 0, stream>>>(
          ptr<__nv_bfloat16>(x), ptr<__nv_bfloat16>(bias), ptr<__nv_bfloat16>(out), n, width);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bias_gelu_fast_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& bias_in) {
  check_bias_gelu(x_in, bias_in, "bias_gelu_fast_backward");
  TORCH_CHECK(x_in.is_cuda() && grad_in.device() == x_in.device(), "bias_gelu_fast_backward_cuda: tensors must be on one CUDA device");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "bias_gelu_fast_backward: grad must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_kernel_image(bias_gelu_fast_backward_kernel<float>, "bias_gelu_fast_backward", x_in.get_device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel(), width = x.size(-1);
  if (n == 0) return dx;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat:
      bias_gelu_fast_backward_kernel<float><<<blocks_for(n), kThreads, 0, stream>>>(
          ptr<float>(grad), ptr<float>(x), ptr<float>(bias), ptr<float>(dx), n, width);
      break;
    case at::kHalf:
      bias_gelu_fast_backward_kernel<__half><<<blocks_for(n), kThreads, 0, stream>>>(
          ptr<__half>(grad), ptr<__half>(x), ptr<__half>(bias), ptr<__half>(dx), n, width);
      break;
    default:
      bias_gelu_fast_backward_kernel<__nv_bfloat16><<<blocks_for(n), kThreads, 0, stream>>>(
          ptr<__nv_bfloat16>(grad), ptr<__nv_bfloat16>(x), ptr<__nv_bfloat16>(bias), ptr<__nv_bfloat16>(dx), n, width);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(vivit_kernels, CUDA, m) {
  m.impl("bias_gelu_fast", &bias_gelu_fast_cuda);
  m.impl("bias_gelu_fast_backward", &bias_gelu_fast_backward_cuda);
}

}  // namespace vivit_kernels
