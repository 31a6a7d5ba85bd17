// Which compiled conv kernel serves a layer on a given GPU, or why none does, decided from sizes
// alone so that it needs no GPU: the rule the launcher (conv2d_bias_act.cu) follows, exposed as the op
// fused_resnet_C::conv2d_kernel for the Python backend and for tests that sweep it over whole networks.

#pragma once

#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <string>

#include "conv2d_cutlass.h"

namespace fused_resnet {

// A convolution as the kernels see it: sizes, element type and conv arguments, no data.
struct Conv2dLayer {
  c10::ScalarType dtype;
  int64_t n, c, h, w;         // x
  int64_t k, weight_c, r, s;  // weight (K, C, R, S); weight_c != c is a grouped convolution
  std::array<int64_t, 2> stride, padding, dilation;
  bool residual;
};

// The GPU the layer is to run on.
struct GpuInfo {
  int64_t major, minor;  // compute capability
  int64_t sm_count;
};

struct Conv2dKernelChoice {
  int config = -1;        // the kernel considered, an index into kConv2dConfigs (-1: none)
  int64_t channels = 0;   // the input channels it reads: x and the filter are zero-padded to this many
  std::string reason;     // why that kernel (or, for the heuristic, any) cannot serve the layer; empty if it can
  bool can_implement = false;  // whether CUTLASS's can_implement accepts that kernel for the layer
};

// Why no kernel can serve the layer, judged from what depends on neither the batch nor the device
// (dtype, groups, output channels, filter size); empty if a kernel may. What the fake kernels and an
// export with a dynamic batch can decide.
std::string conv2d_layer_unsupported_reason(c10::ScalarType dtype, int64_t in_channels, int64_t k, int64_t weight_c,
                                            int64_t r, int64_t s);

// The kernel kConv2dConfigs[config] on `gpu` (config -1: the one the heuristic picks), or why it
// cannot serve the layer. The heuristic takes, for inputs with few channels (the stem), the
// few-channels kernel; otherwise the Hopper kernels where they serve the layer, else the CUTLASS 2.x
// "optimized" ones; within that family, the largest tile that still gives every SM a threadblock
// (big tiles reuse more data, but small layers need many tiles to fill the GPU), never a tile wider
// than the layer's output channels while a narrower one exists (half of a 128-wide tile on 64
// channels would multiply zeros).
Conv2dKernelChoice choose_conv2d_kernel(const Conv2dLayer& layer, const GpuInfo& gpu, int64_t config);

// The sizes of the problem the kernel runs for the layer, its input channels zero-padded to
// `channels`; the pointers are null.
Conv2dProblem conv2d_problem(const Conv2dLayer& layer, int64_t channels);

// Whether this build holds the Hopper kernels (TORCH_CUDA_ARCH_LIST with 9.0a) and they are not
// switched off by FUSED_RESNET_DISABLE_SM90=1, read once per process; Python reads it only through
// choose_conv2d_kernel.
bool hopper_kernels_enabled();

}  // namespace fused_resnet
