// CUTLASS 2.x implicit-GEMM conv2d fprop with the ResNet epilogue fused in, for one element type.
//
// The implicit GEMM has M = N*P*Q (output pixels), N = K (output channels), GEMM-K = R*S*C; it
// runs on tensor cores through the Sm80 mma.sync path (HMMA 16x8x16, fp32 accumulation), which
// sm_90 executes as well. The epilogue is CUTLASS's "with broadcast" epilogue (a per-column
// vector, here the bias) driven by our own functor BiasResidualActivation, whose residual and
// ReLU switches are runtime parameters: one kernel per tile shape serves every epilogue variant.
// A second kernel per tile shape also writes the pre-activation output (Conv2dProblem::preact_out)
// through the epilogue's second output iterator.
//
// Included by conv2d_cutlass_fp16.cu and conv2d_cutlass_bf16.cu only: it is slow to compile.

#pragma once

#include <cstddef>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/Exception.h>

#include "cutlass/array.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/numeric_conversion.h"

#include "conv2d_cutlass.h"
#include "shared_memory.cuh"

namespace fused_resnet {

// What the pre-activation epilogue reads per output channel. EpilogueWithBroadcast hands its functor
// one broadcast vector and no column index, so the three per-channel values travel together as one
// 16-byte element of that vector (fp32, packed by the launcher; `unused` pads to 16 bytes).
struct PreactChannel {
  float bias, scale, shift, unused;

  PreactChannel() = default;
  // The epilogue clears its vector fragments with T(0) (Array::clear), e.g. past the last channel.
  CUTLASS_HOST_DEVICE
  explicit PreactChannel(float value) : bias(value), scale(value), shift(value), unused(value) {}
};
static_assert(sizeof(PreactChannel) == 16, "one PreactChannel per 16-byte load");

// y = act(accumulator + bias [+ residual]), computed in fp32 and rounded once to the output type.
// Follows the functor concept of cutlass::epilogue::threadblock::EpilogueWithBroadcast
// (EpilogueWithBroadcastOpBase): the "source" C is the residual, the broadcast vector is the bias
// (all zeros when the bias pointer is null), Z is the output y.
//
// With Preact the broadcast vector holds PreactChannel elements instead, and T, stored through the
// epilogue's second ("tensor") iterator, is the pre-activation relu(y * scale + shift), computed
// from the same fp32 y that is rounded into Z. Without it T is not stored.
template <typename Element, int Count, bool Preact = false>
class BiasResidualActivation {
 public:
  static bool const kIsSingleSource = true;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = Preact;
  static int const kCount = Count;
  static int const kElementsPerAccess = Count;

  using ElementOutput = Element;
  using ElementC = Element;
  using ElementZ = Element;
  using ElementT = Element;
  using ElementVector = std::conditional_t<Preact, PreactChannel, Element>;
  using ElementAccumulator = float;
  // The type the epilogue converts the broadcast vector to; PreactChannel to itself is a copy.
  using ElementCompute = std::conditional_t<Preact, PreactChannel, float>;

  using FragmentAccumulator = cutlass::Array<float, Count>;
  using FragmentCompute = cutlass::Array<ElementCompute, Count>;
  using FragmentC = cutlass::Array<Element, Count>;
  using FragmentOutput = FragmentC;
  using FragmentZ = FragmentC;
  using FragmentT = FragmentC;

  struct Params {
    bool add_residual = false;
    bool relu = false;
  };

  CUTLASS_HOST_DEVICE
  explicit BiasResidualActivation(Params const& params) : params_(params) {}

  // When false the epilogue never reads the residual tensor.
  CUTLASS_HOST_DEVICE
  bool is_source_needed() const { return params_.add_residual; }

  // Split-K is never used (split_k_slices = 1), so every tile sees the whole GEMM-K range.
  CUTLASS_HOST_DEVICE
  void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& z, FragmentT& t, FragmentAccumulator const& accumulator, FragmentC const& residual,
                  FragmentCompute const& channel) const {
    cutlass::NumericArrayConverter<float, Element, Count> to_float;
    FragmentAccumulator residual_f = to_float(residual);
    FragmentAccumulator value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) {
      value[i] = accumulator[i] + bias(channel[i]) + residual_f[i];
    }
    finish(z, t, value, channel);
  }

  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& z, FragmentT& t, FragmentAccumulator const& accumulator,
                  FragmentCompute const& channel) const {
    FragmentAccumulator value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) {
      value[i] = accumulator[i] + bias(channel[i]);
    }
    finish(z, t, value, channel);
  }

 private:
  CUTLASS_HOST_DEVICE
  static float bias(float value) { return value; }
  CUTLASS_HOST_DEVICE
  static float bias(PreactChannel const& channel) { return channel.bias; }

  // Written so that NaN stays NaN, as torch.relu does (fmaxf would turn it into 0).
  CUTLASS_HOST_DEVICE
  static float relu(float value) { return value < 0.f ? 0.f : value; }

  CUTLASS_HOST_DEVICE
  void finish(FragmentZ& z, FragmentT& t, FragmentAccumulator value, FragmentCompute const& channel) const {
    if (params_.relu) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < Count; ++i) {
        value[i] = relu(value[i]);
      }
    }
    cutlass::NumericArrayConverter<Element, float, Count, cutlass::FloatRoundStyle::round_to_nearest> to_output;
    z = to_output(value);
    if constexpr (Preact) {
      FragmentAccumulator preact;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < Count; ++i) {
        preact[i] = relu(value[i] * channel[i].scale + channel[i].shift);
      }
      t = to_output(preact);
    }
  }

  Params params_;
};

// Tile shapes of kConv2dConfigs, by index.
template <Conv2dAlgorithm Algorithm, int TileM, int TileN, int TileK, int WarpM, int WarpN, int Stages>
struct ConvShape {
  static constexpr Conv2dAlgorithm kAlgorithm = Algorithm;
  using Threadblock = cutlass::gemm::GemmShape<TileM, TileN, TileK>;
  using Warp = cutlass::gemm::GemmShape<WarpM, WarpN, TileK>;
  static constexpr int kStages = Stages;
};

template <int Config>
struct ConfigShape;
template <>
struct ConfigShape<0> : ConvShape<Conv2dAlgorithm::kOptimized, 128, 128, 64, 64, 64, 3> {};
template <>
struct ConfigShape<1> : ConvShape<Conv2dAlgorithm::kOptimized, 128, 64, 64, 64, 32, 4> {};
template <>
struct ConfigShape<2> : ConvShape<Conv2dAlgorithm::kOptimized, 64, 64, 64, 32, 32, 4> {};
template <>
struct ConfigShape<3> : ConvShape<Conv2dAlgorithm::kFewChannels, 128, 64, 32, 64, 32, 4> {};

static_assert(kNumSm80Conv2dConfigs == 4, "the first kConv2dConfigs and ConfigShape<> must list the same kernels");

template <int Config>
constexpr bool shape_matches_table() {
  using Shape = ConfigShape<Config>;
  return Shape::kAlgorithm == kConv2dConfigs[Config].algorithm &&
         Shape::Threadblock::kM == kConv2dConfigs[Config].tile_m &&
         Shape::Threadblock::kN == kConv2dConfigs[Config].tile_n;
}
static_assert(shape_matches_table<0>() && shape_matches_table<1>() && shape_matches_table<2>() &&
                  shape_matches_table<3>(),
              "ConfigShape<> disagrees with kConv2dConfigs");

template <typename Element, typename Shape, bool Preact = false>
struct ConvKernel {
  static constexpr int kAlignment =
      Shape::kAlgorithm == Conv2dAlgorithm::kOptimized ? kOptimizedAlignment : kFewChannelsAlignment;
  static constexpr cutlass::conv::IteratorAlgorithm kIteratorAlgorithm =
      Shape::kAlgorithm == Conv2dAlgorithm::kOptimized ? cutlass::conv::IteratorAlgorithm::kOptimized
                                                        : cutlass::conv::IteratorAlgorithm::kFewChannels;
  // The output side (bias, residual, out) always moves 8 elements = 16 bytes at a time.
  using Epilogue = BiasResidualActivation<Element, kOptimizedAlignment, Preact>;

  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, cutlass::layout::TensorNHWC,  // x
      Element, cutlass::layout::TensorNHWC,  // filter (KRSC)
      Element, cutlass::layout::TensorNHWC,  // out, residual
      float,                                 // accumulator
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Shape::Threadblock, typename Shape::Warp,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>,
      Shape::kStages, cutlass::arch::OpMultiplyAdd, kIteratorAlgorithm,
      cutlass::conv::StrideSupport::kStrided,  // fprop's iterators take any stride; the flag matters for dgrad
      kAlignment, kAlignment>::Kernel;

  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

inline void check_cutlass(cutlass::Status status, char const* what, int config, const Conv2dProblem& problem) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "fused_resnet: CUTLASS conv kernel ", kConv2dConfigs[config].name,
              " ", what, " for the layer ", describe(problem), ": ", cutlass::cutlassGetStatusString(status));
}

// The CUTLASS arguments for the problem (null pointers are fine for can_implement).
template <typename Element, int Config, bool Preact = false>
typename ConvKernel<Element, ConfigShape<Config>, Preact>::Device::Arguments conv2d_arguments(
    const Conv2dProblem& problem) {
  using K = ConvKernel<Element, ConfigShape<Config>, Preact>;
  using Layout = cutlass::layout::TensorNHWC;
  using Ref = cutlass::TensorRef<Element, Layout>;
  auto ptr = [](const void* p) { return static_cast<Element*>(const_cast<void*>(p)); };

  cutlass::conv::Conv2dProblemSize size(problem.n, problem.h, problem.w, problem.c, problem.k, problem.r, problem.s,
                                        problem.p, problem.q, problem.pad_h, problem.pad_w, problem.stride_h,
                                        problem.stride_w, problem.dilation_h, problem.dilation_w,
                                        cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1, /*groups=*/1);
  Layout out_layout = Layout::packed({problem.n, problem.p, problem.q, problem.k});
  Ref out(ptr(problem.out), out_layout);
  // Without a residual the epilogue never reads the source tensor; it still needs a valid ref.
  Ref residual(problem.residual ? ptr(problem.residual) : ptr(problem.out), out_layout);

  return typename K::Device::Arguments(
      size, Ref(ptr(problem.x), Layout::packed({problem.n, problem.h, problem.w, problem.c})),
      Ref(ptr(problem.weight), Layout::packed({problem.k, problem.r, problem.s, problem.c})), residual, out,
      {problem.residual != nullptr, problem.relu}, cutlass::conv::SplitKMode::kSerial,
      /*ptr_Vector=*/const_cast<void*>(Preact ? problem.preact_channels : problem.bias),
      /*ptr_Tensor=*/Preact ? problem.preact_out : nullptr,
      /*ldr=*/0,  // the vector is the same for every output pixel
      /*ldt=*/Preact ? problem.k : 0);
}

template <typename Element, int Config>
bool can_implement_conv2d(const Conv2dProblem& problem) {
  using K = ConvKernel<Element, ConfigShape<Config>>;
  return K::Device::can_implement(conv2d_arguments<Element, Config>(problem)) == cutlass::Status::kSuccess;
}

template <typename Element, int Config, bool Preact>
void run_conv2d(const Conv2dProblem& problem, cudaStream_t stream) {
  using K = ConvKernel<Element, ConfigShape<Config>, Preact>;
  const typename K::Device::Arguments args = conv2d_arguments<Element, Config, Preact>(problem);
  check_cutlass(K::Device::can_implement(args), "cannot run", Config, problem);
  // Serial reduction with split_k_slices = 1: the kernel needs no workspace.
  TORCH_INTERNAL_ASSERT(K::Device::get_workspace_size(args) == 0);

  typename K::Kernel::Params params(args, /*semaphore=*/nullptr);
  // ImplicitGemmConvolutionWithFusedEpilogue counts the GEMM-K iterations as the optimized
  // iterators walk them, R*S*ceil(C/TileK), whatever the iterator. The few-channels iterators walk
  // R*S*C as one range and need only ceil(R*S*C/TileK): 7 instead of 49 tiles for the 7x7 stem
  // (the surplus tiles would only multiply zero filter taps, but cost the time of 42 more).
  params.gemm_k_iterations = cutlass::conv::implicit_gemm_k_iterations(
      cutlass::conv::Operator::kFprop, ConfigShape<Config>::Threadblock::kK, args.problem_size, K::kIteratorAlgorithm);
  dim3 grid = typename K::Kernel::ThreadblockSwizzle().get_grid_shape(params.grid_tiled_shape);
  dim3 block(K::Kernel::kThreadCount, 1, 1);
  int smem_bytes = int(sizeof(typename K::Kernel::SharedStorage));
  allow_dynamic_shared_memory<typename K::Kernel>(reinterpret_cast<const void*>(cutlass::Kernel<typename K::Kernel>),
                                                  smem_bytes);
  cutlass::Kernel<typename K::Kernel><<<grid, block, smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element, int Config>
void run_conv2d(const Conv2dProblem& problem, cudaStream_t stream) {
  problem.preact_out ? run_conv2d<Element, Config, true>(problem, stream)
                     : run_conv2d<Element, Config, false>(problem, stream);
}

template <typename Element>
void run_conv2d_config(const Conv2dProblem& problem, int config, cudaStream_t stream) {
  switch (config) {
    case 0:
      return run_conv2d<Element, 0>(problem, stream);
    case 1:
      return run_conv2d<Element, 1>(problem, stream);
    case 2:
      return run_conv2d<Element, 2>(problem, stream);
    case 3:
      return run_conv2d<Element, 3>(problem, stream);
  }
  TORCH_CHECK(false, "fused_resnet: conv config ", config, " is not a CUTLASS 2.x kernel [0, ", kNumSm80Conv2dConfigs, ")");
}

template <typename Element>
bool can_implement_conv2d_config(const Conv2dProblem& problem, int config) {
  switch (config) {
    case 0:
      return can_implement_conv2d<Element, 0>(problem);
    case 1:
      return can_implement_conv2d<Element, 1>(problem);
    case 2:
      return can_implement_conv2d<Element, 2>(problem);
    case 3:
      return can_implement_conv2d<Element, 3>(problem);
  }
  TORCH_CHECK(false, "fused_resnet: conv config ", config, " is not a CUTLASS 2.x kernel [0, ", kNumSm80Conv2dConfigs, ")");
}

}  // namespace fused_resnet
