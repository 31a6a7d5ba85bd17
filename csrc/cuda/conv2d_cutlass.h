// The CUTLASS convolution kernels of this build, as seen from code that does not include CUTLASS.
//
// Every kernel computes, for a dense NHWC input x, a dense KRSC filter and a dense NHWC output,
//
//     out[n,p,q,k] = act( sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] * w[k,r,s,c]
//                         + bias[k] + residual[n,p,q,k] )
//
// with fp32 accumulation (act = ReLU or identity, bias and residual optional). The launcher
// (conv2d_bias_act.cu) turns torch tensors into a Conv2dProblem; the instantiations live in
// conv2d_cutlass_{fp16,bf16}.cu (CUTLASS 2.x, sm_80 and newer) and conv2d_cutlass_sm90_{fp16,bf16}.cu
// (CUTLASS 3.x, Hopper only) so that they compile in parallel.

#pragma once

#include <cuda_runtime.h>

#include <string>

namespace fused_resnet {

enum class Conv2dAlgorithm {
  // CUTLASS's "optimized" fprop iterators: one filter position (r, s) per step of the GEMM-K
  // loop, channels read 8 at a time. Needs C % 8 == 0 (the launcher zero-pads channels).
  kOptimized,
  // CUTLASS's "few channels" iterators: the GEMM-K dimension R*S*C is walked as one flat range,
  // 4 channels at a time, so a 3-channel stem padded to 4 does not waste most of each K tile.
  kFewChannels,
  // Hopper only (compute capability 9.0; built when TORCH_CUDA_ARCH_LIST holds 9.0a, which defines
  // FUSED_RESNET_WITH_SM90): CUTLASS 3.x kernels that load activation tiles by TMA in im2col mode,
  // multiply them with wgmma in a warp-specialized pipeline, and run the epilogue as a CUTLASS
  // epilogue-visitor tree (bias, residual, optional ReLU) stored by TMA. Every K tile is 64 channels
  // of one filter tap, so C must be a multiple of kHopperChannelMultiple.
  kHopperTma,
};

struct Conv2dConfig {
  const char* name;
  Conv2dAlgorithm algorithm;
  int tile_m;  // threadblock tile along M = N*P*Q (output pixels)
  int tile_n;  // threadblock tile along N = K (output channels)
};

// The `config` argument of the conv ops is an index into this table (-1: chosen by a heuristic).
// conv2d_cutlass.cuh holds the matching tile shapes and checks them against this table.
inline constexpr Conv2dConfig kConv2dConfigs[] = {
    {"optimized_128x128x64_3stage", Conv2dAlgorithm::kOptimized, 128, 128},
    {"optimized_128x64x64_4stage", Conv2dAlgorithm::kOptimized, 128, 64},
    {"optimized_64x64x64_4stage", Conv2dAlgorithm::kOptimized, 64, 64},
    {"few_channels_128x64x32_4stage", Conv2dAlgorithm::kFewChannels, 128, 64},
#ifdef FUSED_RESNET_WITH_SM90
    {"sm90_tma_wgmma_128x128x64", Conv2dAlgorithm::kHopperTma, 128, 128},
    {"sm90_tma_wgmma_128x64x64", Conv2dAlgorithm::kHopperTma, 128, 64},
    {"sm90_tma_wgmma_64x128x64", Conv2dAlgorithm::kHopperTma, 64, 128},
#endif
};
inline constexpr int kNumConv2dConfigs = sizeof(kConv2dConfigs) / sizeof(kConv2dConfigs[0]);

// The few-channels kernels read 4 channels per access: inputs with at most this many channels
// (zero-padded to a multiple of 4) go to them.
inline constexpr int kFewChannelsMaxC = 8;
inline constexpr int kFewChannelsAlignment = 4;
inline constexpr int kOptimizedAlignment = 8;
// The CUTLASS 2.x kernels come first in kConv2dConfigs, the Hopper ones (if built) after them.
inline constexpr int kNumSm80Conv2dConfigs = 4;
inline constexpr int kHopperChannelMultiple = 64;
// The Hopper kernels' TMA im2col loads step through the input with the conv's stride as the
// descriptor's element stride, which the hardware bounds by 8. Encoding a larger one fails, and
// CUTLASS only asserts on that (compiled out under NDEBUG): the kernel would run on a garbage
// descriptor. The rule that picks kernels (conv2d_kernel_choice.h) keeps such layers off them.
inline constexpr int kHopperMaxStride = 8;

// One convolution, every tensor dense, 16-byte aligned, of the kernel's element type.
// c is the (possibly zero-padded) channel count of both x and the filter. A problem with null
// pointers describes a layer for can_implement.
struct Conv2dProblem {
  int n, h, w, c;  // x: N x H x W x C
  int k, r, s;     // filter: K x R x S x C
  int p, q;        // out, residual: N x P x Q x K
  int pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w;
  const void* x;
  const void* weight;
  const void* bias;      // K values, or nullptr
  const void* residual;  // or nullptr
  void* out;
  bool relu;
  // The second, pre-activated output preact_out = relu(y * preact_scale[k] + preact_shift[k]) of y = out
  // (then computed without ReLU). Null pointers: no second output. The Hopper kernels read scale and
  // shift; the CUTLASS 2.x kernels read preact_channels instead (and not bias), K fp32 quadruples
  // {bias[k] (0 without bias), scale[k], shift[k], unused}, 128-byte aligned (the epilogue loads the
  // quadruples of 8 channels as one aligned array).
  const void* preact_scale = nullptr;     // K values
  const void* preact_shift = nullptr;     // K values
  const void* preact_channels = nullptr;  // K x 4 floats
  void* preact_out = nullptr;             // N x P x Q x K
};

// "N=.. C=.. HxW=.. -> K=.. RxS=.. stride .. padding .. dilation .." for error messages.
std::string describe(const Conv2dProblem& problem);

// Run kConv2dConfigs[config] on `stream`. The caller has checked that the kernel serves the problem
// (conv2d_kernel_choice.h); errors (a kernel CUTLASS refuses, a failed launch) are thrown as
// c10::Error naming the layer and the cause.
void conv2d_cutlass_fp16(const Conv2dProblem& problem, int config, cudaStream_t stream);
void conv2d_cutlass_bf16(const Conv2dProblem& problem, int config, cudaStream_t stream);

// Whether CUTLASS's own check, can_implement, accepts kConv2dConfigs[config] for the sizes of the
// problem (its pointers are not read). Host code only: it needs no GPU.
bool conv2d_cutlass_fp16_can_implement(const Conv2dProblem& problem, int config);
bool conv2d_cutlass_bf16_can_implement(const Conv2dProblem& problem, int config);

#ifdef FUSED_RESNET_WITH_SM90
// The same for the Hopper kernels. A layer with a residual runs another kernel than one without, so
// can_implement is told which.
void conv2d_cutlass_sm90_fp16(const Conv2dProblem& problem, int config, cudaStream_t stream);
void conv2d_cutlass_sm90_bf16(const Conv2dProblem& problem, int config, cudaStream_t stream);
bool conv2d_cutlass_sm90_fp16_can_implement(const Conv2dProblem& problem, bool residual, int config);
bool conv2d_cutlass_sm90_bf16_can_implement(const Conv2dProblem& problem, bool residual, int config);
#endif

}  // namespace fused_resnet
