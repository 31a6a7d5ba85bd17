// CUTLASS 3.x implicit-GEMM conv2d fprop for Hopper (sm_90a), with the ResNet epilogue fused in,
// for one element type.
//
// Same GEMM view as conv2d_cutlass.cuh (M = N*P*Q output pixels, N = K output channels, GEMM-K =
// C*S*R), built from CUTLASS's collective builders: the mainloop loads activation tiles with TMA in
// im2col mode (the padding is TMA's out-of-bounds zero fill) and filter tiles with tiled TMA, and a
// consumer warpgroup multiplies them with wgmma while a producer warp keeps the pipeline full. The
// epilogue is CUTLASS's LinCombPerColBiasEltAct visitor tree,
//
//     out = act(accumulator + residual + bias[k]),
//
// computed in fp32 and rounded once; act is our OptionalRelu, switched at run time. A layer without
// a residual runs a kernel built without the source operand (ElementC = void) rather than one that
// multiplies a source it never loaded by beta = 0 (0 * an unloaded register need not be 0).
//
// Included by conv2d_cutlass_sm90_fp16.cu and conv2d_cutlass_sm90_bf16.cu only: it is slow to compile.

#pragma once

#ifdef FUSED_RESNET_WITH_SM90

#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cute/tensor.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"

#include "conv2d_cutlass.h"

namespace fused_resnet {
namespace sm90 {

// ReLU when `enabled`, else the identity. Written so that NaN stays NaN, as torch.relu does.
// The epilogue applies it to fragments (the Array specialisation) with the scalar's Arguments.
struct OptionalReluArguments {
  bool enabled = false;
};

template <class T>
struct OptionalRelu {
  using Arguments = OptionalReluArguments;

  CUTLASS_HOST_DEVICE
  T operator()(T const& value, Arguments const& args) const { return args.enabled && value < T(0) ? T(0) : value; }
};

template <class T, int N>
struct OptionalRelu<cutlass::Array<T, N>> {
  using Arguments = OptionalReluArguments;

  CUTLASS_HOST_DEVICE
  cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& values, Arguments const& args) const {
    cutlass::Array<T, N> result;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      result[i] = args.enabled && values[i] < T(0) ? T(0) : values[i];
    }
    return result;
  }
};

template <typename Element, int TileM, int TileN, bool Residual>
struct HopperConv {
  static constexpr int kAlignment = 8;  // 16 bytes: what TMA needs of every dense dimension
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Shape<cute::Int<kHopperChannelMultiple>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ElementResidual = std::conditional_t<Residual, Element, void>;
  using Fusion =
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<OptionalRelu, Element, float, Element, ElementResidual, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,  //
      ElementResidual, cutlass::layout::TensorNHWC, kAlignment,        // residual (the source C)
      Element, cutlass::layout::TensorNHWC, kAlignment,                // out
      cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,  //
      Element, cutlass::layout::TensorNHWC, kAlignment,                                     // x
      Element, cutlass::layout::TensorNHWC, kAlignment,                                     // filter (KRSC)
      float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<int(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

// The strides of the output (and residual) as the epilogue sees them: the M mode is (Q, P, N).
template <class Stride, class Problem>
Stride output_stride(const Problem& problem) {
  Stride stride;
  cute::for_each(cute::make_seq<cute::rank<0>(Stride{})>{}, [&](auto i) {
    cute::get<0, i>(stride) = problem.stride_C[Problem::RankT - 2 - i];
  });
  return stride;
}

template <typename Element, int TileM, int TileN, bool Residual>
bool run(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  using K = HopperConv<Element, TileM, TileN, Residual>;
  using Kernel = typename K::Kernel;
  auto in = [](const void* p) { return static_cast<const Element*>(p); };

  typename K::Problem shape(cutlass::conv::Mode::kCrossCorrelation, {problem.n, problem.h, problem.w, problem.c},
                            {problem.k, problem.r, problem.s, problem.c}, {problem.pad_h, problem.pad_w},
                            {problem.pad_h, problem.pad_w}, {problem.stride_h, problem.stride_w},
                            {problem.dilation_h, problem.dilation_w}, /*groups=*/1);
  typename K::Device::Arguments args{
      shape,
      {in(problem.x), in(problem.weight)},
      {{},
       static_cast<const typename K::ElementResidual*>(problem.residual),  // null without a residual
       output_stride<typename Kernel::StrideC>(shape),
       static_cast<Element*>(problem.out),
       output_stride<typename Kernel::StrideD>(shape)}};
  auto& epilogue = args.epilogue.thread;
  epilogue.alpha = 1.f;
  epilogue.beta = Residual ? 1.f : 0.f;
  epilogue.bias_ptr = in(problem.bias);  // null: a bias of zeros
  epilogue.activation.enabled = problem.relu;

  if (K::Device::can_implement(args) != cutlass::Status::kSuccess) {
    return false;
  }
  at::Tensor workspace;
  const size_t workspace_bytes = K::Device::get_workspace_size(args);
  if (workspace_bytes > 0) {
    workspace = at::empty({int64_t(workspace_bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  }
  typename K::Device conv;
  cutlass::Status status = conv.initialize(args, workspace_bytes ? workspace.data_ptr() : nullptr, stream);
  if (status == cutlass::Status::kSuccess) {
    status = conv.run(stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet: CUTLASS conv kernel ", kConv2dConfigs[config].name,
              " failed for the layer ", describe(problem), ": ", cutlass::cutlassGetStatusString(status));
  return true;
}

constexpr bool hopper_entry_is(int index, int tile_m, int tile_n) {
  const Conv2dConfig& config = kConv2dConfigs[kNumSm80Conv2dConfigs + index];
  return config.algorithm == Conv2dAlgorithm::kHopperTma && config.tile_m == tile_m && config.tile_n == tile_n;
}
static_assert(kNumConv2dConfigs == kNumSm80Conv2dConfigs + 3 && hopper_entry_is(0, 128, 128) &&
                  hopper_entry_is(1, 128, 64) && hopper_entry_is(2, 64, 128),
              "run_config disagrees with the Hopper entries of kConv2dConfigs");

template <typename Element, bool Residual>
bool run_config(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  // The tile shapes of the Hopper entries of kConv2dConfigs, in table order (checked above).
  switch (config - kNumSm80Conv2dConfigs) {
    case 0:
      return run<Element, 128, 128, Residual>(problem, config, stream);
    case 1:
      return run<Element, 128, 64, Residual>(problem, config, stream);
    case 2:
      return run<Element, 64, 128, Residual>(problem, config, stream);
  }
  TORCH_CHECK(false, "fused_resnet: conv config ", config, " is not a Hopper kernel");
}

}  // namespace sm90
}  // namespace fused_resnet

// Defines conv2d_cutlass_sm90_<suffix>, declared in conv2d_cutlass.h, for one element type.
#define FUSED_RESNET_DEFINE_SM90_CONV(suffix, Element)                                                    \
  namespace fused_resnet {                                                                                \
  bool conv2d_cutlass_sm90_##suffix(const Conv2dProblem& problem, int config, cudaStream_t stream) {    \
    return problem.residual ? sm90::run_config<Element, true>(problem, config, stream)                  \
                            : sm90::run_config<Element, false>(problem, config, stream);                \
  }                                                                                                       \
  }

#endif  // FUSED_RESNET_WITH_SM90
