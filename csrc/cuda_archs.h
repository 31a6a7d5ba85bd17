// The GPU architectures this build of the library has machine code for, as recorded at build time.

#pragma once

#include <cstdint>
#include <string>

namespace fused_resnet {

// The TORCH_CUDA_ARCH_LIST the library was built with, e.g. "8.0;9.0a".
std::string built_cuda_archs();

// Why the library's kernels cannot run on a GPU of compute capability major.minor, naming the
// archs it was built for and the command that rebuilds it for this one; empty when they can.
std::string cuda_arch_unsupported_reason(int64_t major, int64_t minor);

}  // namespace fused_resnet
