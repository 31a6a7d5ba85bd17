// conv2d + bias [+ residual] [+ ReLU] on CUDA: turns torch tensors into a Conv2dProblem for the
// CUTLASS kernels (conv2d_cutlass.cuh), picks a kernel, and registers the CUDA ops.
//
// The kernels want dense, 16-byte aligned NHWC activations and a KRSC filter with a channel count
// they can read in whole vectors. Tensors that already are so (channels_last tensors from the
// caching allocator, whose blocks are 512-byte aligned) are used in place; anything else is copied
// once into that form, with input channels zero-padded (zero filter taps add nothing).

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "conv2d_cutlass.h"

namespace fused_resnet {

std::string describe(const Conv2dProblem& p) {
  std::ostringstream s;
  s << "(x N=" << p.n << " C=" << p.c << " H=" << p.h << " W=" << p.w << ", weight K=" << p.k << " R=" << p.r
    << " S=" << p.s << ", stride " << p.stride_h << "x" << p.stride_w << ", padding " << p.pad_h << "x" << p.pad_w
    << ", dilation " << p.dilation_h << "x" << p.dilation_w << ", out P=" << p.p << " Q=" << p.q << ")";
  return s.str();
}

namespace {

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The dense, 16-byte aligned NHWC form of `t`, an (N, C, H, W) tensor of any strides (or a
// (K, C, R, S) filter, giving KRSC), with its channels zero-padded to `channels`.
at::Tensor dense_nhwc(const at::Tensor& t, int64_t channels) {
  at::Tensor nhwc = t.permute({0, 2, 3, 1});
  const int64_t c = nhwc.size(3);
  if (channels == c && nhwc.is_contiguous() && aligned16(nhwc)) {
    return nhwc;
  }
  at::Tensor dense = channels == c
                         ? at::empty(nhwc.sizes(), nhwc.options())
                         : at::zeros({nhwc.size(0), nhwc.size(1), nhwc.size(2), channels}, nhwc.options());
  dense.narrow(3, 0, c).copy_(nhwc);
  return dense;
}

int to_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "fused_resnet_C::conv2d_bias_act: ", what,
              " = ", value, " does not fit the kernels' 32-bit indices");
  return int(value);
}

// (N, K, P, Q), after checking the arguments that determine it.
std::vector<int64_t> output_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fused_resnet_C::conv2d_bias_act: ";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, "x and weight must be 4-D, got shapes ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              "stride, padding and dilation must be pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, "got stride ", stride, ", padding ", padding, ", dilation ", dilation);
  TORCH_CHECK(weight.size(1) == x.size(1), op, "weight ", weight.sizes(), " does not match x ", x.sizes(),
              " (grouped convolution is not supported)");
  TORCH_CHECK(weight.numel() > 0, op, "empty weight ", weight.sizes());
  std::vector<int64_t> shape{x.size(0), weight.size(0), 0, 0};
  for (int i = 0; i < 2; ++i) {
    // How far the first filter tap can move; checked before dividing, as C++ rounds toward zero.
    const int64_t span = x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1;
    TORCH_CHECK(span >= 0, op, "empty output for x ", x.sizes(), " and weight ", weight.sizes(), " with stride ",
                stride, ", padding ", padding, ", dilation ", dilation);
    shape[2 + i] = span / stride[i] + 1;
  }
  return shape;
}

// The heuristic behind config = -1: the few-channels kernel for inputs with few channels (the
// stem); otherwise, among the Hopper kernels where they serve the layer, else the CUTLASS 2.x
// "optimized" ones, the largest tile that still gives every SM a threadblock, since big tiles
// reuse more data but small layers need many tiles to fill the GPU. The Python backend measures
// every kernel instead (fused_resnet/backends/cuda.py), unless told not to.
int choose_config(int64_t channels, int64_t m, int64_t n, int64_t sm_count, bool hopper) {
  const Conv2dAlgorithm family = channels <= kFewChannelsMaxC ? Conv2dAlgorithm::kFewChannels
                                 : hopper                     ? Conv2dAlgorithm::kHopperTma
                                                              : Conv2dAlgorithm::kOptimized;
  int chosen = -1;
  for (int i = 0; i < kNumConv2dConfigs; ++i) {  // each family is listed from its largest tile down
    const Conv2dConfig& config = kConv2dConfigs[i];
    if (config.algorithm != family) {
      continue;
    }
    chosen = i;
    const int64_t tiles = ((m + config.tile_m - 1) / config.tile_m) * ((n + config.tile_n - 1) / config.tile_n);
    if (tiles >= sm_count) {
      break;
    }
  }
  return chosen;
}

// Whether this build holds the Hopper kernels (TORCH_CUDA_ARCH_LIST with 9.0a) and they are not
// switched off with FUSED_RESNET_DISABLE_SM90=1 (read once; the Python backend reads it too).
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

// What the launcher needs to know of the current device, queried once per device rather than
// on every launch.
struct DeviceInfo {
  int major = 0;
  int minor = 0;
  int sm_count = 0;
};

const DeviceInfo& current_device_info() {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> queried;
  static std::array<DeviceInfo, C10_COMPILE_TIME_MAX_GPUS> infos;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < int(infos.size()), "fused_resnet: device index ", device, " out of range");
  std::call_once(queried[device], [device] {
    DeviceInfo& info = infos[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  });
  return infos[device];
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fused_resnet_C::conv2d_bias_act: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet_C::conv2d_bias_act: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
}

void conv2d_bias_act_out_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, int64_t config,
                              at::Tensor& out) {
  const char* op = "fused_resnet_C::conv2d_bias_act: ";
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "the CUTLASS kernels take float16 or bfloat16, got ", x.scalar_type());
  check_tensor(weight, "weight", x);
  check_tensor(out, "out", x);
  const std::vector<int64_t> out_shape = output_shape(x, weight, stride, padding, dilation);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = weight.size(0), r = weight.size(2), s = weight.size(3), p = out_shape[2], q = out_shape[3];
  TORCH_CHECK(k % kOptimizedAlignment == 0, op, "the number of output channels (", k, ") must be a multiple of ",
              kOptimizedAlignment);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), op, "out has shape ", out.sizes(), ", expected ",
              at::IntArrayRef(out_shape));
  if (bias) {
    check_tensor(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, op, "bias must have shape (", k, "), got ", bias->sizes());
  }
  if (residual) {
    check_tensor(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), op, "residual has shape ", residual->sizes(),
                ", expected ", at::IntArrayRef(out_shape));
  }
  at::assert_no_internal_overlap(out);
  for (const at::Tensor* input : {&x, &weight, bias ? &*bias : nullptr, residual ? &*residual : nullptr}) {
    if (input != nullptr) {
      at::assert_no_overlap(out, *input);
    }
  }
  if (n == 0) {
    return;
  }

  c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo& device = current_device_info();
  const int major = device.major;
  const int minor = device.minor;
  TORCH_CHECK(major >= 8, op, "the tensor-core kernels need compute capability 8.0 or newer, ", x.device(), " has ",
              major, ".", minor);
  // sm_90a machine code runs on compute capability 9.0 only.
  const bool hopper_device = hopper_kernels_enabled() && major == 9 && minor == 0;
  const int64_t sm_count = device.sm_count;

  const bool heuristic = config < 0;
  if (heuristic) {
    config = choose_config(c, n * p * q, k, sm_count, hopper_device && c % kHopperChannelMultiple == 0);
  }
  TORCH_CHECK(config < kNumConv2dConfigs, op, "config ", config, " out of range [-1, ", kNumConv2dConfigs, ")");
  const Conv2dConfig& kernel = kConv2dConfigs[config];
  int64_t channels = round_up(c, kOptimizedAlignment);
  if (kernel.algorithm == Conv2dAlgorithm::kFewChannels) {
    TORCH_CHECK(c <= kFewChannelsMaxC, op, "config ", kernel.name, " serves inputs with at most ", kFewChannelsMaxC,
                " channels, x has ", c);
    channels = round_up(c, kFewChannelsAlignment);
  }
  if (kernel.algorithm == Conv2dAlgorithm::kHopperTma) {
    TORCH_CHECK(hopper_kernels_enabled(), op, "config ", kernel.name, " is switched off (FUSED_RESNET_DISABLE_SM90=1)");
    TORCH_CHECK(hopper_device, op, "config ", kernel.name, " runs on compute capability 9.0 only, ", x.device(),
                " has ", major, ".", minor);
    TORCH_CHECK(c % kHopperChannelMultiple == 0, op, "config ", kernel.name, " needs a multiple of ",
                kHopperChannelMultiple, " input channels, x has ", c);
  }

  // CUTLASS computes element offsets in 32 bits: an operand of 2 GiB or more would be misaddressed.
  // (Python callers are routed elsewhere before this; a graph exported with a dynamic batch is not.)
  const int64_t element_size = x.element_size();
  for (const auto& [what, elements] : {std::pair<const char*, int64_t>{"x", n * h * w * channels},
                                       {"weight", k * r * s * channels},
                                       {"out", n * k * p * q}}) {
    TORCH_CHECK(elements * element_size < (int64_t(1) << 31), op, what, " would take ", elements * element_size,
                " bytes; the kernels index operands below 2 GiB with 32-bit offsets (split the batch)");
  }

  const at::Tensor x_nhwc = dense_nhwc(x, channels);
  const at::Tensor weight_krsc = dense_nhwc(weight, channels);
  at::Tensor bias_dense;
  if (bias) {
    bias_dense = bias->contiguous();
    if (!aligned16(bias_dense)) {
      bias_dense = bias_dense.clone();
    }
  }
  const at::Tensor residual_nhwc = residual ? dense_nhwc(*residual, k) : at::Tensor();
  at::Tensor out_nhwc = out.permute({0, 2, 3, 1});
  const bool out_in_place = out_nhwc.is_contiguous() && aligned16(out_nhwc);
  at::Tensor target = out_in_place ? out_nhwc : at::empty(out_nhwc.sizes(), out_nhwc.options());

  Conv2dProblem problem{};
  problem.n = to_int(n, "N");
  problem.h = to_int(h, "H");
  problem.w = to_int(w, "W");
  problem.c = to_int(channels, "C");
  problem.k = to_int(k, "K");
  problem.r = to_int(r, "R");
  problem.s = to_int(s, "S");
  problem.p = to_int(p, "P");
  problem.q = to_int(q, "Q");
  problem.pad_h = to_int(padding[0], "padding");
  problem.pad_w = to_int(padding[1], "padding");
  problem.stride_h = to_int(stride[0], "stride");
  problem.stride_w = to_int(stride[1], "stride");
  problem.dilation_h = to_int(dilation[0], "dilation");
  problem.dilation_w = to_int(dilation[1], "dilation");
  problem.x = x_nhwc.const_data_ptr();
  problem.weight = weight_krsc.const_data_ptr();
  problem.bias = bias ? bias_dense.const_data_ptr() : nullptr;
  problem.residual = residual ? residual_nhwc.const_data_ptr() : nullptr;
  problem.out = target.mutable_data_ptr();
  problem.relu = relu;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = x.scalar_type() == at::kHalf;
  bool done = false;
#ifdef FUSED_RESNET_WITH_SM90
  if (kernel.algorithm == Conv2dAlgorithm::kHopperTma) {
    done = half ? conv2d_cutlass_sm90_fp16(problem, int(config), stream)
                : conv2d_cutlass_sm90_bf16(problem, int(config), stream);
    TORCH_CHECK(done || heuristic, op, "config ", kernel.name, " cannot serve the layer ", describe(problem),
                " (TMA im2col limits on padding and filter size)");
    if (!done) {
      // Chosen by the heuristic but beyond TMA's limits: a CUTLASS 2.x kernel serves it (C is a
      // multiple of 64, so the operands need no other padding).
      config = choose_config(c, n * p * q, k, sm_count, false);
    }
  }
#endif
  if (!done) {
    if (half) {
      conv2d_cutlass_fp16(problem, int(config), stream);
    } else {
      conv2d_cutlass_bf16(problem, int(config), stream);
    }
  }
  if (!out_in_place) {
    out_nhwc.copy_(target);
  }
}

at::Tensor conv2d_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, int64_t config) {
  at::Tensor out = at::empty(output_shape(x, weight, stride, padding, dilation),
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  conv2d_bias_act_out_cuda(x, weight, bias, residual, stride, padding, dilation, relu, config, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act_cuda);
  m.impl("conv2d_bias_act_out", &conv2d_bias_act_out_cuda);
}

}  // namespace fused_resnet
