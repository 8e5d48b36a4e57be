// CUDA implementation of preprocess_video: argument checks on the host, one kernel launch on the current
// stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../preprocess_op.h"
#include "arch_check.h"
#include "kernels.cuh"

namespace vivit_kernels {
namespace {

constexpr int kThreads = 256;

at::Tensor preprocess_video_cuda(const at::Tensor& frames, at::IntArrayRef resize_hw, at::IntArrayRef crop_box,
                                 double scale, double offset, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype) {
  TORCH_CHECK(frames.is_cuda(), "preprocess_video_cuda: frames must be on a CUDA device");
  const PreprocessParams p = make_preprocess_params(frames, resize_hw, crop_box, scale, offset, mean, std, dtype);
  const c10::cuda::CUDAGuard guard(frames.device());
  check_kernel_image(preprocess_video_kernel<float>, "preprocess_video", frames.get_device());
  at::Tensor out = empty_output(frames, p, dtype);
  const int64_t total = out.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* in = frames.data_ptr<uint8_t>();
  switch (dtype) {
    case at::kFloat:
      preprocess_video_kernel<float><<<blocks, kThreads, 0, stream>>>(in, out.data_ptr<float>(), p);
      break;
    case at::kHalf:
      preprocess_video_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          in, reinterpret_cast<__half*>(out.data_ptr<at::Half>()), p);
      break;
    case at::kByte:
      preprocess_video_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(in, out.data_ptr<uint8_t>(), p);
      break;
    default:
      preprocess_video_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          in, reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), p);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vivit_kernels, CUDA, m) { m.impl("preprocess_video", &preprocess_video_cuda); }

}  // namespace vivit_kernels
