// Launches the Hopper conv kernels of conv2d_cutlass_sm90_kernel.cuh for one element type: workspace,
// shared-memory opt-in, launch and its error check.
//
// Included by conv2d_cutlass_sm90_fp16.cu and conv2d_cutlass_sm90_bf16.cu only: it is slow to compile.

#pragma once

#ifdef FUSED_RESNET_WITH_SM90

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "conv2d_cutlass_sm90_kernel.cuh"
#include "shared_memory.cuh"

namespace fused_resnet {
namespace sm90 {

template <typename Element, int TileM, int TileN, bool Residual, bool Preact>
void run(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  using K = HopperConv<Element, TileM, TileN, Residual, Preact>;
  using Kernel = typename K::Kernel;
  const char* name = kConv2dConfigs[config].name;
  const typename K::Device::Arguments args = arguments<Element, TileM, TileN, Residual, Preact>(problem);
  TORCH_CHECK(K::Device::can_implement(args) == cutlass::Status::kSuccess, "fused_resnet: CUTLASS conv kernel ", name,
              " cannot run the layer ", describe(problem));

  at::Tensor workspace;
  const size_t workspace_bytes = K::Device::get_workspace_size(args);
  if (workspace_bytes > 0) {
    workspace = at::empty({int64_t(workspace_bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  }
  void* workspace_ptr = workspace_bytes ? workspace.data_ptr() : nullptr;
  const cutlass::Status status = Kernel::initialize_workspace(args, workspace_ptr, stream, nullptr);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet: CUTLASS conv kernel ", name,
              " could not set up its workspace for the layer ", describe(problem), ": ",
              cutlass::cutlassGetStatusString(status));
  // Launched here rather than by ConvUniversalAdapter::run, which reads and clears the launch error
  // and returns only "Error Internal": C10_CUDA_KERNEL_LAUNCH_CHECK reports the cause. The adapter
  // launches a kernel with a 1x1x1 cluster the same way.
  static_assert(cute::size(typename K::ClusterShape{}) == 1, "a cluster launch needs cudaLaunchKernelEx");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, workspace_ptr);
  const int smem_bytes = Kernel::SharedStorageSize;
  allow_dynamic_shared_memory<Kernel>(reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>), smem_bytes);
  cutlass::device_kernel<Kernel><<<K::Device::get_grid_shape(params), Kernel::get_block_shape(), smem_bytes, stream>>>(
      params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr bool hopper_entry_is(int index, int tile_m, int tile_n) {
  const Conv2dConfig& config = kConv2dConfigs[kNumSm80Conv2dConfigs + index];
  return config.algorithm == Conv2dAlgorithm::kHopperTma && config.tile_m == tile_m && config.tile_n == tile_n;
}
static_assert(kNumConv2dConfigs == kNumSm80Conv2dConfigs + 3 && hopper_entry_is(0, 128, 128) &&
                  hopper_entry_is(1, 128, 64) && hopper_entry_is(2, 64, 128),
              "with_tile_shape disagrees with the Hopper entries of kConv2dConfigs");

// The tile shapes of the Hopper entries of kConv2dConfigs, in table order (checked above), as
// `action.template operator()<TileM, TileN>()`.
template <typename Action>
decltype(auto) with_tile_shape(int config, Action&& action) {
  switch (config - kNumSm80Conv2dConfigs) {
    case 0:
      return action.template operator()<128, 128>();
    case 1:
      return action.template operator()<128, 64>();
    case 2:
      return action.template operator()<64, 128>();
  }
  TORCH_CHECK(false, "fused_resnet: conv config ", config, " is not a Hopper kernel");
}

template <typename Element>
void run_config(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  with_tile_shape(config, [&]<int TileM, int TileN>() {
    const bool preact = problem.preact_out != nullptr;
    if (problem.residual) {
      preact ? run<Element, TileM, TileN, true, true>(problem, config, stream)
             : run<Element, TileM, TileN, true, false>(problem, config, stream);
    } else {
      preact ? run<Element, TileM, TileN, false, true>(problem, config, stream)
             : run<Element, TileM, TileN, false, false>(problem, config, stream);
    }
  });
}

template <typename Element>
bool can_implement_config(const Conv2dProblem& problem, bool residual, int config) {
  return with_tile_shape(config, [&]<int TileM, int TileN>() {
    return residual ? can_implement<Element, TileM, TileN, true>(problem)
                    : can_implement<Element, TileM, TileN, false>(problem);
  });
}

}  // namespace sm90
}  // namespace fused_resnet

// Defines conv2d_cutlass_sm90_<suffix> and its can_implement, declared in conv2d_cutlass.h, for one
// element type.
#define FUSED_RESNET_DEFINE_SM90_CONV(suffix, Element)                                                       \
  namespace fused_resnet {                                                                                   \
  void conv2d_cutlass_sm90_##suffix(const Conv2dProblem& problem, int config, cudaStream_t stream) {       \
    sm90::run_config<Element>(problem, config, stream);                                                     \
  }                                                                                                          \
  bool conv2d_cutlass_sm90_##suffix##_can_implement(const Conv2dProblem& problem, bool residual, int config) { \
    return sm90::can_implement_config<Element>(problem, residual, config);                                  \
  }                                                                                                          \
  }

#endif  // FUSED_RESNET_WITH_SM90
