// Marks functions compiled for both the host (CPU build) and the device (CUDA build).
#pragma once

#if defined(__CUDACC__)
#define VK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VK_HOST_DEVICE inline
#endif
