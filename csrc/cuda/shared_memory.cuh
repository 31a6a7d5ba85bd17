// Opting a kernel in to more than 48 KiB of dynamic shared memory, which is a per-device attribute
// of the kernel: set once per device and kernel, rather than before every launch.

#pragma once

#include <array>
#include <mutex>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace fused_resnet {

// `Kernel` is the type that names the kernel function `kernel`: each instantiation keeps its own flags.
template <typename Kernel>
void allow_dynamic_shared_memory(const void* kernel, int bytes) {
  if (bytes < (48 << 10)) {
    return;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> configured;
  TORCH_CHECK(device >= 0 && device < int(configured.size()), "fused_resnet: device index ", device, " out of range");
  std::call_once(configured[device], [kernel, bytes] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  });
}

}  // namespace fused_resnet
