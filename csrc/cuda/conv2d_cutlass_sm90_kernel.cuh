// CUTLASS 3.x implicit-GEMM conv2d fprop for Hopper (sm_90a), with the ResNet epilogue fused in:
// the kernel types and the arguments they get for a Conv2dProblem. No ATen: host-side tests compile
// this header alone (tests/cute/); conv2d_cutlass_sm90.cuh launches the kernels.
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
//     y = accumulator + residual + bias[k]         stored by an auxiliary TMA store (LinearAuxStore)
//     out = relu(y * scale[k] + shift[k])          the kernel's own output
//
// so that one kernel writes both, y from the same fp32 value the pre-activation reads.

#pragma once

#ifdef FUSED_RESNET_WITH_SM90

#include <climits>
#include <cstdint>
#include <type_traits>

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

// The output (and residual) as CUTLASS's conv epilogue sees them: M is the mode (Q, P, N).
using OutputStride = cutlass::gemm::TagToStrideC_t<cutlass::layout::TensorNHWC>;
// y as the auxiliary store sees it: M is the linearised pixel index n*P*Q + p*Q + q, whose stride in a
// dense NHWC tensor is K. One stride per mode of (M, N, L), congruent with the linearised problem shape
// by construction, rather than the three of OutputStride read against a one-mode M (which CuTe happens
// to coalesce down to the first, right only for a dense tensor).
using LinearOutputStride = cute::Stride<int64_t, cute::_1, cute::_0>;
using ChannelVectorStride = cute::Stride<cute::_0, cute::_1, int64_t>;  // one value per output channel

// The pre-activation epilogue as a fusion operation: what the epilogue builder needs to plan an auxiliary
// output (y: Element, dense NHWC over the linearised M), with the tree PreactTree.
template <typename Element, typename ElementResidual>
struct PreactFusion : cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
                          LinearOutputStride, OptionalRelu, Element, float, Element, Element, ElementResidual, float> {};

// CUTLASS's TMA auxiliary store, with its TMA descriptor made for the linearised problem shape. The
// epilogue builds descriptors from the conv's own problem shape, whose M is (Q, P, N), but runs the
// tiles of the linearised one: this store is given (Q*P*N, K, ...) at set-up, as it gets at run time,
// so that shape and LinearOutputStride agree in both.
template <int Stages, class EpilogueTile, class Element, class SmemLayoutAtom, class CopyOpR2S>
struct LinearAuxStore
    : cutlass::epilogue::fusion::Sm90AuxStore<Stages, EpilogueTile, Element, cutlass::FloatRoundStyle::round_to_nearest,
                                              LinearOutputStride, SmemLayoutAtom, CopyOpR2S> {
  using Base = cutlass::epilogue::fusion::Sm90AuxStore<Stages, EpilogueTile, Element,
                                                       cutlass::FloatRoundStyle::round_to_nearest, LinearOutputStride,
                                                       SmemLayoutAtom, CopyOpR2S>;
  using typename Base::Arguments;
  using typename Base::Params;
  using Base::Base;

  // The number of output pixels, M, from M as a mode (Q, P, N) or as one number.
  template <class ProblemShape>
  static int64_t pixels(ProblemShape const& problem_shape) {
    return cute::fold(cute::get<0>(problem_shape), int64_t(1), [](int64_t product, auto extent) {
      return product * int64_t(extent);
    });
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    return pixels(problem_shape) <= INT32_MAX && Base::can_implement(problem_shape, args);
  }

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                                  void* workspace) {
    auto [m, n, k, l] = cute::append<4>(problem_shape, 1);
    return Base::to_underlying_arguments(cute::make_shape(int(pixels(problem_shape)), n, k, l), args, workspace);
  }
};

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
            // Staged through shared memory and stored by TMA, pipelined like the output's store.
            LinearAuxStore<StagesD, EpilogueTile, Element, SmemLayoutAtom, CopyOpR2S>,
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
    fused_resnet::sm90::LinearOutputStride dY = {};

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

// y's stride over the linearised M: a Conv2dProblem's output is dense NHWC, so pixel m starts at m * K.
inline LinearOutputStride linear_output_stride(const Conv2dProblem& problem) {
  return {int64_t(problem.k), {}, {}};
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
    epilogue.dY = linear_output_stride(problem);
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

}  // namespace sm90
}  // namespace fused_resnet

#endif  // FUSED_RESNET_WITH_SM90
