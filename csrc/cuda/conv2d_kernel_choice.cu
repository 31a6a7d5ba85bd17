// The rule that decides which conv kernel serves a layer (see conv2d_kernel_choice.h). Host code
// only: it runs without a GPU.

#include "conv2d_kernel_choice.h"

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

#include "../cuda_archs.h"

namespace fused_resnet {
namespace {

// The kernels read and write 16 bytes (8 half-precision values) of output channels at a time.
constexpr int64_t kOutChannelMultiple = kOptimizedAlignment;
// The optimized activation iterators keep one mask bit per filter row and column in 32-bit words.
constexpr int64_t kMaxFilterSize = 32;
// CUTLASS indexes each operand with 32-bit offsets: every operand must stay below 2 GiB.
constexpr int64_t kMaxOperandBytes = int64_t(1) << 31;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

template <typename... Parts>
std::string text(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return "float32";
    case c10::kDouble:
      return "float64";
    default:
      return c10::toString(dtype);
  }
}

int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// The input channels kernel family `algorithm` reads for a layer with c of them.
int64_t padded_channels(Conv2dAlgorithm algorithm, int64_t c) {
  switch (algorithm) {
    case Conv2dAlgorithm::kFewChannels:
      return round_up(c, kFewChannelsAlignment);
    case Conv2dAlgorithm::kOptimized:
      return round_up(c, kOptimizedAlignment);
    case Conv2dAlgorithm::kHopperTma:
      return c;  // a multiple of kHopperChannelMultiple, or the kernel does not serve the layer
  }
  return c;
}

bool cutlass_can_implement(const Conv2dLayer& layer, int config, int64_t channels) {
  const Conv2dProblem problem = conv2d_problem(layer, channels);
  const bool half = layer.dtype == c10::kHalf;
#ifdef FUSED_RESNET_WITH_SM90
  if (kConv2dConfigs[config].algorithm == Conv2dAlgorithm::kHopperTma) {
    return half ? conv2d_cutlass_sm90_fp16_can_implement(problem, layer.residual, config)
                : conv2d_cutlass_sm90_bf16_can_implement(problem, layer.residual, config);
  }
#endif
  return half ? conv2d_cutlass_fp16_can_implement(problem, config) : conv2d_cutlass_bf16_can_implement(problem, config);
}

// Why kernel `config` cannot serve the layer on `gpu` by this library's own rules (empty if it can);
// CUTLASS's can_implement is asked separately.
std::string kernel_unsupported_reason(const Conv2dLayer& layer, const GpuInfo& gpu, int config) {
  const Conv2dConfig& kernel = kConv2dConfigs[config];
  if (kernel.algorithm == Conv2dAlgorithm::kFewChannels && layer.c > kFewChannelsMaxC) {
    return text(kernel.name, " serves inputs with at most ", kFewChannelsMaxC, " channels, x has ", layer.c);
  }
  if (kernel.algorithm == Conv2dAlgorithm::kHopperTma) {
    if (!hopper_kernels_enabled()) {
      return text(kernel.name, " is switched off (FUSED_RESNET_DISABLE_SM90=1)");
    }
    // sm_90a machine code runs on compute capability 9.0 only.
    if (gpu.major != 9 || gpu.minor != 0) {
      return text(kernel.name, " runs on compute capability 9.0 only, the GPU has ", gpu.major, ".", gpu.minor);
    }
    if (layer.c % kHopperChannelMultiple != 0) {
      return text(kernel.name, " needs a multiple of ", kHopperChannelMultiple, " input channels, x has ", layer.c);
    }
    if (layer.stride[0] > kHopperMaxStride || layer.stride[1] > kHopperMaxStride) {
      return text(kernel.name, " takes strides up to ", kHopperMaxStride, " (TMA im2col element strides), got ",
                  layer.stride[0], "x", layer.stride[1]);
    }
  }
  return "";
}

// Among the kernels of `family` (listed from the largest tile down), the heuristic's pick.
int heuristic_config(Conv2dAlgorithm family, int64_t m, int64_t k, int64_t sm_count) {
  int64_t narrowest = std::numeric_limits<int64_t>::max();
  for (const Conv2dConfig& config : kConv2dConfigs) {
    if (config.algorithm == family) {
      narrowest = std::min<int64_t>(narrowest, config.tile_n);
    }
  }
  int chosen = -1;
  for (int i = 0; i < kNumConv2dConfigs; ++i) {
    const Conv2dConfig& config = kConv2dConfigs[i];
    if (config.algorithm != family || config.tile_n > std::max(k, narrowest)) {
      continue;
    }
    chosen = i;
    const int64_t tiles = ((m + config.tile_m - 1) / config.tile_m) * ((k + config.tile_n - 1) / config.tile_n);
    if (tiles >= sm_count) {
      break;
    }
  }
  return chosen;
}

}  // namespace

bool hopper_kernels_enabled() {
#ifdef FUSED_RESNET_WITH_SM90
  static const bool enabled = [] {
    const char* value = std::getenv("FUSED_RESNET_DISABLE_SM90");
    return value == nullptr || std::string(value) != "1";
  }();
  return enabled;
#else
  return false;
#endif
}

std::string conv2d_layer_unsupported_reason(c10::ScalarType dtype, int64_t in_channels, int64_t k, int64_t weight_c,
                                            int64_t r, int64_t s) {
  if (dtype != c10::kHalf && dtype != c10::kBFloat16) {
    return text("its tensor-core conv kernels take float16 and bfloat16, not ", dtype_name(dtype));
  }
  if (weight_c != in_channels) {
    return text("grouped convolution (x has ", in_channels, " channels, the weight ", weight_c,
                " per group) is not implemented in the CUTLASS conv kernels");
  }
  if (in_channels <= 0 || k <= 0 || r <= 0 || s <= 0) {
    return text("an empty weight (", k, ", ", weight_c, ", ", r, ", ", s, ")");
  }
  if (k % kOutChannelMultiple != 0) {
    return text(k, " output channels: the kernels need a multiple of ", kOutChannelMultiple);
  }
  if (r > kMaxFilterSize || s > kMaxFilterSize) {
    return text("a ", r, "x", s, " kernel: the kernels take at most ", kMaxFilterSize, "x", kMaxFilterSize);
  }
  return "";
}

Conv2dProblem conv2d_problem(const Conv2dLayer& layer, int64_t channels) {
  Conv2dProblem problem{};
  problem.n = int(layer.n);
  problem.h = int(layer.h);
  problem.w = int(layer.w);
  problem.c = int(channels);
  problem.k = int(layer.k);
  problem.r = int(layer.r);
  problem.s = int(layer.s);
  problem.p = int(output_size(layer.h, layer.r, layer.stride[0], layer.padding[0], layer.dilation[0]));
  problem.q = int(output_size(layer.w, layer.s, layer.stride[1], layer.padding[1], layer.dilation[1]));
  problem.pad_h = int(layer.padding[0]);
  problem.pad_w = int(layer.padding[1]);
  problem.stride_h = int(layer.stride[0]);
  problem.stride_w = int(layer.stride[1]);
  problem.dilation_h = int(layer.dilation[0]);
  problem.dilation_w = int(layer.dilation[1]);
  return problem;
}

Conv2dKernelChoice choose_conv2d_kernel(const Conv2dLayer& layer, const GpuInfo& gpu, int64_t config) {
  Conv2dKernelChoice choice;
  choice.reason = conv2d_layer_unsupported_reason(layer.dtype, layer.c, layer.k, layer.weight_c, layer.r, layer.s);
  if (!choice.reason.empty()) {
    return choice;
  }
  if (config < -1 || config >= kNumConv2dConfigs) {
    choice.reason = text("config ", config, " out of range [-1, ", kNumConv2dConfigs, ")");
    return choice;
  }
  choice.reason = cuda_arch_unsupported_reason(gpu.major, gpu.minor);
  if (!choice.reason.empty()) {
    return choice;
  }
  if (gpu.major < 8) {
    choice.reason = text("its tensor-core kernels need compute capability 8.0 or newer, the GPU has ", gpu.major, ".",
                         gpu.minor);
    return choice;
  }
  const int64_t p = output_size(layer.h, layer.r, layer.stride[0], layer.padding[0], layer.dilation[0]);
  const int64_t q = output_size(layer.w, layer.s, layer.stride[1], layer.padding[1], layer.dilation[1]);
  const int64_t m = layer.n * p * q;
  if (p == 0 || q == 0) {
    choice.reason = text("an empty output for the layer ", describe(conv2d_problem(layer, layer.c)));
    return choice;
  }

  if (config < 0) {
    const Conv2dAlgorithm family = layer.c <= kFewChannelsMaxC ? Conv2dAlgorithm::kFewChannels
                                   : gpu.major == 9 && gpu.minor == 0 ? Conv2dAlgorithm::kHopperTma
                                                                      : Conv2dAlgorithm::kOptimized;
    config = heuristic_config(family, m, layer.k, gpu.sm_count);
    if (config >= 0 && family == Conv2dAlgorithm::kHopperTma &&
        (!kernel_unsupported_reason(layer, gpu, int(config)).empty() ||
         !cutlass_can_implement(layer, int(config), layer.c))) {
      // A layer beyond the Hopper kernels' limits: a CUTLASS 2.x kernel serves it.
      config = heuristic_config(Conv2dAlgorithm::kOptimized, m, layer.k, gpu.sm_count);
    }
  }
  choice.config = int(config);
  const Conv2dConfig& kernel = kConv2dConfigs[config];
  choice.channels = padded_channels(kernel.algorithm, layer.c);

  // Sizes that do not fit the kernels' 32-bit sizes and offsets.
  const int64_t element_size = c10::elementSize(layer.dtype);
  for (const auto& [what, elements] : {std::pair<const char*, int64_t>{"x", layer.n * layer.h * layer.w * choice.channels},
                                       {"weight", layer.k * layer.r * layer.s * choice.channels},
                                       {"out", m * layer.k}}) {
    if (elements * element_size >= kMaxOperandBytes) {
      choice.reason = text(what, " would take ", elements * element_size,
                           " bytes: the kernels index operands below 2 GiB with 32-bit offsets (split the batch)");
      return choice;
    }
  }
  for (int64_t size : {layer.h, layer.w, layer.padding[0], layer.padding[1], layer.stride[0], layer.stride[1],
                       layer.dilation[0], layer.dilation[1]}) {
    if (size > std::numeric_limits<int>::max()) {
      choice.reason = text("a size or conv argument of ", size, " does not fit the kernels' 32-bit indices");
      return choice;
    }
  }

  choice.can_implement = cutlass_can_implement(layer, choice.config, choice.channels);
  choice.reason = kernel_unsupported_reason(layer, gpu, choice.config);
  if (choice.reason.empty() && !choice.can_implement) {
    choice.reason = text("CUTLASS's can_implement refuses ", kernel.name, " for the layer ",
                         describe(conv2d_problem(layer, choice.channels)));
  }
  return choice;
}

}  // namespace fused_resnet
