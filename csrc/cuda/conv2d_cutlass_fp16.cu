// The fp16 instantiations of the CUTLASS conv kernels (see conv2d_cutlass.cuh).

#include "conv2d_cutlass.cuh"

namespace fused_resnet {

void conv2d_cutlass_fp16(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  run_conv2d_config<cutlass::half_t>(problem, config, stream);
}

bool conv2d_cutlass_fp16_can_implement(const Conv2dProblem& problem, int config) {
  return can_implement_conv2d_config<cutlass::half_t>(problem, config);
}

}  // namespace fused_resnet
