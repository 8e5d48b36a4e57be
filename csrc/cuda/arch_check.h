// A clear error, before the first launch, when the extension holds no kernel image for the GPU at hand (a GPU
// newer than every architecture it was built for can still JIT the embedded PTX of the newest one; an older one
// cannot): it names the GPU's architecture, what the build contains, and the variable to rebuild with.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#define VK_STRINGIZE_(...) #__VA_ARGS__
#define VK_STRINGIZE(...) VK_STRINGIZE_(__VA_ARGS__)
#ifndef VIVIT_KERNELS_CUDA_ARCHS
#define VIVIT_KERNELS_CUDA_ARCHS unknown
#endif

namespace vivit_kernels {

// Checked once per kernel and device (cudaFuncGetAttributes fails for a kernel without a loadable image).
template <typename Kernel>
void check_kernel_image(Kernel kernel, const char* op, int device) {
  static bool checked[64] = {};
  if (device >= 0 && device < 64 && checked[device]) return;
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel));
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // clear the sticky-free error so later CUDA calls are not blamed for it
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    TORCH_CHECK(false, op, ": vivit_kernels' CUDA extension has no kernel image for this GPU (", prop->name, ", sm_",
                prop->major, prop->minor, "); it was built for the architectures ", VK_STRINGIZE(VIVIT_KERNELS_CUDA_ARCHS),
                ". Rebuild it for this GPU: VIVIT_KERNELS_CUDA_ARCHS=\"", prop->major, ".", prop->minor,
                "\" pip install --no-build-isolation -e .");
  }
  C10_CUDA_CHECK(err);
  if (device >= 0 && device < 64) checked[device] = true;
}

}  // namespace vivit_kernels
