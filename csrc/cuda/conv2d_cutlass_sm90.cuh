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
// With a pre-activation output (a pre-activation ResNet's next BatchNorm + ReLU, see PreactFusion) the
// tree is instead
//
//     y = accumulator + residual + bias[k]         stored by an auxiliary TMA store
//     out = relu(y * scale[k] + shift[k])          the kernel's own output
//
// so that one kernel writes both, y from the same fp32 value the pre-activation reads.
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
#include "shared_memory.cuh"

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

// The pre-activation epilogue as a fusion operation: what the epilogue builder needs to plan an auxiliary
// output (an NHWC tensor of Element, like the output), with the tree PreactTree.
template <typename Element, typename ElementResidual>
struct PreactFusion : cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
                          cutlass::layout::TensorNHWC, OptionalRelu, Element, float, Element, Element, ElementResidual, float> {};

using OutputStride = cutlass::gemm::TagToStrideC_t<cutlass::layout::TensorNHWC>;
using ChannelVectorStride = cute::Stride<cute::_0, cute::_1, int64_t>;  // one value per output channel

// relu(scale * store(y) + shift), y = beta * residual + (1 * accumulator + bias).
template <int StagesC, int StagesD, class Element, class ElementResidual, class CtaTileShapeMNK, class EpilogueTile,
          class SmemLayoutAtom, class CopyOpR2S>
using PreactTree = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<OptionalRelu, Element, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, Element, float, ChannelVectorStride>,  // scale
        cutlass::epilogue::fusion::Sm90EVT<
            // Stages 0: stored from registers, not by TMA, whose tile cannot follow the conv's (Q, P, N) pixel mode.
            cutlass::epilogue::fusion::Sm90AuxStore<0, EpilogueTile, Element,
                                                    cutlass::FloatRoundStyle::round_to_nearest, OutputStride,
                                                    SmemLayoutAtom, CopyOpR2S>,
            cutlass::epilogue::fusion::Sm90LinCombPerColBias<StagesC, CtaTileShapeMNK, EpilogueTile, float, float,
                                                             Element, ElementResidual, float>>,       // y
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, Element, float, ChannelVectorStride>>>;  // shift

}  // namespace sm90
}  // namespace fused_resnet

namespace cutlass::epilogue::fusion {

// PreactTree as the callbacks of fused_resnet::sm90::PreactFusion in the warp-specialized TMA epilogue.
template <int StagesC, int StagesD, int FragmentSize, bool ReuseSmemC, bool DelayTmaStore, class Element,
          class ElementResidual, class CtaTileShapeMNK, class EpilogueTile, class SmemLayoutAtom, class CopyOpR2S>
struct FusionCallbacks<epilogue::Sm90TmaWarpSpecialized<StagesC, StagesD, FragmentSize, ReuseSmemC, DelayTmaStore>,
                       fused_resnet::sm90::PreactFusion<Element, ElementResidual>, CtaTileShapeMNK, EpilogueTile,
                       SmemLayoutAtom, CopyOpR2S>
    : fused_resnet::sm90::PreactTree<StagesC, StagesD, Element, ElementResidual, CtaTileShapeMNK, EpilogueTile,
                                     SmemLayoutAtom, CopyOpR2S> {
  using Impl = fused_resnet::sm90::PreactTree<StagesC, StagesD, Element, ElementResidual, CtaTileShapeMNK,
                                              EpilogueTile, SmemLayoutAtom, CopyOpR2S>;
  using Operation = fused_resnet::sm90::PreactFusion<Element, ElementResidual>;

  struct Arguments {
    float beta = 0.f;  // 1 with a residual
    Element const* bias_ptr = nullptr;  // null: zeros
    Element const* scale_ptr = nullptr;
    Element const* shift_ptr = nullptr;
    Element* y_ptr = nullptr;
    fused_resnet::sm90::OutputStride dY = {};

    operator typename Impl::Arguments() const {
      using fused_resnet::sm90::ChannelVectorStride;
      return {
          {
              {scale_ptr, Element(0), ChannelVectorStride{}},
              {
                  {
                      {{beta}, {nullptr}, {}},  // beta
                      {},                       // residual
                      {{{1.f}, {nullptr}, {}}, {}, {bias_ptr, Element(0), ChannelVectorStride{}}, {}},
                      {},
                  },
                  {y_ptr, dY},
              },
              {shift_ptr, Element(0), ChannelVectorStride{}},
              {},
          },
          {true},  // the pre-activation's ReLU
      };
    }
  };

  using Impl::Impl;
};

}  // namespace cutlass::epilogue::fusion

namespace fused_resnet {
namespace sm90 {

template <typename Element, int TileM, int TileN, bool Residual, bool Preact = false>
struct HopperConv {
  static constexpr int kAlignment = 8;  // 16 bytes: what TMA needs of every dense dimension
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Shape<cute::Int<kHopperChannelMultiple>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ElementResidual = std::conditional_t<Residual, Element, void>;
  using Fusion = std::conditional_t<
      Preact, PreactFusion<Element, ElementResidual>,
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<OptionalRelu, Element, float, Element, ElementResidual, float>>;
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

// The CUTLASS arguments for the problem (null pointers are fine for can_implement).
template <typename Element, int TileM, int TileN, bool Residual, bool Preact = false>
typename HopperConv<Element, TileM, TileN, Residual, Preact>::Device::Arguments arguments(const Conv2dProblem& problem) {
  using K = HopperConv<Element, TileM, TileN, Residual, Preact>;
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
  epilogue.beta = Residual ? 1.f : 0.f;
  epilogue.bias_ptr = in(problem.bias);  // null: a bias of zeros
  if constexpr (Preact) {
    // The kernel's output is the pre-activation; y goes to the auxiliary store.
    args.epilogue.ptr_D = static_cast<Element*>(problem.preact_out);
    epilogue.scale_ptr = in(problem.preact_scale);
    epilogue.shift_ptr = in(problem.preact_shift);
    epilogue.y_ptr = static_cast<Element*>(problem.out);
    epilogue.dY = output_stride<OutputStride>(shape);
  } else {
    epilogue.alpha = 1.f;
    epilogue.activation.enabled = problem.relu;
  }
  return args;
}

template <typename Element, int TileM, int TileN, bool Residual, bool Preact = false>
bool can_implement(const Conv2dProblem& problem) {
  using K = HopperConv<Element, TileM, TileN, Residual, Preact>;
  return K::Device::can_implement(arguments<Element, TileM, TileN, Residual, Preact>(problem)) ==
         cutlass::Status::kSuccess;
}

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
