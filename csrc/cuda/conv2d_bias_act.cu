// conv2d + bias [+ residual] [+ ReLU] on CUDA: turns torch tensors into a Conv2dProblem for the
// CUTLASS kernels (conv2d_cutlass.cuh), runs the kernel conv2d_kernel_choice.h picks, and registers
// the CUDA ops.
//
// The kernels want dense, 16-byte aligned NHWC activations and a KRSC filter with a channel count
// they can read in whole vectors. Tensors that already are so (channels_last tensors from the
// caching allocator, whose blocks are 512-byte aligned) are used in place; anything else is copied
// once into that form, with input channels zero-padded (zero filter taps add nothing). The stem's
// 3 channels are padded to 4 here, on every call: the op takes any 3-channel input, and a network
// entry that fed it 4 channels would change the fused model's stem weight, state_dict and exports.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "conv2d_cutlass.h"
#include "conv2d_kernel_choice.h"
#include "preact_channels.h"

namespace fused_resnet {

std::string describe(const Conv2dProblem& p) {
  std::ostringstream s;
  s << "(x N=" << p.n << " C=" << p.c << " H=" << p.h << " W=" << p.w << ", weight K=" << p.k << " R=" << p.r
    << " S=" << p.s << ", stride " << p.stride_h << "x" << p.stride_w << ", padding " << p.pad_h << "x" << p.pad_w
    << ", dilation " << p.dilation_h << "x" << p.dilation_w << ", out P=" << p.p << " Q=" << p.q << ")";
  return s.str();
}

namespace {

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
  // One pass over the tensor: the copy, and zeros written to the padding channels only.
  at::Tensor dense = at::empty({nhwc.size(0), nhwc.size(1), nhwc.size(2), channels}, nhwc.options());
  dense.narrow(3, 0, c).copy_(nhwc);
  dense.narrow(3, c, channels - c).zero_();
  return dense;
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

// What the launcher needs to know of the current device, queried once per device rather than
// on every launch.
const GpuInfo& current_gpu_info() {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> queried;
  static std::array<GpuInfo, C10_COMPILE_TIME_MAX_GPUS> infos;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < int(infos.size()), "fused_resnet: device index ", device, " out of range");
  std::call_once(queried[device], [device] {
    int major = 0, minor = 0, sm_count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
    infos[device] = GpuInfo{major, minor, sm_count};
  });
  return infos[device];
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fused_resnet_C::conv2d_bias_act: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet_C::conv2d_bias_act: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
}

// The second output of conv2d_preact: out = relu(y * scale + shift), per output channel.
struct PreactOutput {
  const at::Tensor& scale;
  const at::Tensor& shift;
  at::Tensor& out;
};

// A per-channel vector as the kernels read it: dense and 16-byte aligned.
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor dense = t.contiguous();
  return aligned16(dense) ? dense : dense.clone();
}

void run_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, bool relu, int64_t config, at::Tensor& out, const PreactOutput* preact) {
  const char* op = preact ? "fused_resnet_C::conv2d_preact: " : "fused_resnet_C::conv2d_bias_act: ";
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got one on ", x.device());
  check_tensor(weight, "weight", x);
  check_tensor(out, "out", x);
  const std::vector<int64_t> out_shape = output_shape(x, weight, stride, padding, dilation);
  const int64_t n = x.size(0), k = weight.size(0);
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
  if (preact) {
    for (const at::Tensor* vector : {&preact->scale, &preact->shift}) {
      check_tensor(*vector, "scale and shift", x);
      TORCH_CHECK(vector->dim() == 1 && vector->size(0) == k, op, "scale and shift must have shape (", k, "), got ",
                  vector->sizes());
    }
    check_tensor(preact->out, "out_preact", x);
    TORCH_CHECK(preact->out.sizes() == at::IntArrayRef(out_shape), op, "out_preact has shape ", preact->out.sizes(),
                ", expected ", at::IntArrayRef(out_shape));
    at::assert_no_internal_overlap(preact->out);
    at::assert_no_overlap(preact->out, out);
  }
  at::assert_no_internal_overlap(out);
  // Every input against both outputs: scale and shift are read in the Hopper epilogue while other CTAs
  // write y and z.
  for (const at::Tensor* input : {&x, &weight, bias ? &*bias : nullptr, residual ? &*residual : nullptr,
                                  preact ? &preact->scale : nullptr, preact ? &preact->shift : nullptr}) {
    if (input != nullptr) {
      at::assert_no_overlap(out, *input);
      if (preact) {
        at::assert_no_overlap(preact->out, *input);
      }
    }
  }
  const Conv2dLayer layer{x.scalar_type(), n, x.size(1), x.size(2), x.size(3), k, weight.size(1), weight.size(2),
                          weight.size(3), {stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]},
                          residual.has_value()};
  // What no kernel serves is an error whatever the batch, so it is checked before the empty batch returns.
  const std::string unsupported = conv2d_layer_unsupported_reason(layer.dtype, layer.c, layer.k, layer.weight_c,
                                                                   layer.r, layer.s);
  TORCH_CHECK(unsupported.empty(), op, unsupported);
  if (n == 0) {
    return;
  }

  c10::cuda::CUDAGuard guard(x.device());
  const GpuInfo& gpu = current_gpu_info();
  const Conv2dKernelChoice choice = choose_conv2d_kernel(layer, gpu, config);
  TORCH_CHECK(choice.reason.empty(), op, "on ", x.device(), ": ", choice.reason);
  const Conv2dConfig& kernel = kConv2dConfigs[choice.config];

  const at::Tensor x_nhwc = dense_nhwc(x, choice.channels);
  const at::Tensor weight_krsc = dense_nhwc(weight, choice.channels);
  const at::Tensor bias_dense = bias ? dense_aligned(*bias) : at::Tensor();
  const at::Tensor residual_nhwc = residual ? dense_nhwc(*residual, k) : at::Tensor();
  at::Tensor out_nhwc = out.permute({0, 2, 3, 1});
  const bool out_in_place = out_nhwc.is_contiguous() && aligned16(out_nhwc);
  at::Tensor target = out_in_place ? out_nhwc : at::empty(out_nhwc.sizes(), out_nhwc.options());

  Conv2dProblem problem = conv2d_problem(layer, choice.channels);
  problem.x = x_nhwc.const_data_ptr();
  problem.weight = weight_krsc.const_data_ptr();
  problem.bias = bias ? bias_dense.const_data_ptr() : nullptr;
  problem.residual = residual ? residual_nhwc.const_data_ptr() : nullptr;
  problem.out = target.mutable_data_ptr();
  problem.relu = relu;
  at::Tensor scale_dense, shift_dense, channels, preact_nhwc, preact_target;
  if (preact) {
    if (kernel.algorithm == Conv2dAlgorithm::kHopperTma) {
      scale_dense = dense_aligned(preact->scale);
      shift_dense = dense_aligned(preact->shift);
      problem.preact_scale = scale_dense.const_data_ptr();
      problem.preact_shift = shift_dense.const_data_ptr();
    } else {
      // The CUTLASS 2.x epilogue takes one per-channel vector: bias, scale and shift side by side.
      channels = pack_preact_channels(bias, preact->scale, preact->shift);
      TORCH_INTERNAL_ASSERT(reinterpret_cast<std::uintptr_t>(channels.const_data_ptr()) % 128 == 0);
      problem.preact_channels = channels.const_data_ptr();
    }
    preact_nhwc = preact->out.permute({0, 2, 3, 1});
    preact_target = preact_nhwc.is_contiguous() && aligned16(preact_nhwc) ? preact_nhwc
                                                                         : at::empty(preact_nhwc.sizes(), preact_nhwc.options());
    problem.preact_out = preact_target.mutable_data_ptr();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = x.scalar_type() == at::kHalf;
  if (kernel.algorithm == Conv2dAlgorithm::kHopperTma) {
#ifdef FUSED_RESNET_WITH_SM90
    if (half) {
      conv2d_cutlass_sm90_fp16(problem, choice.config, stream);
    } else {
      conv2d_cutlass_sm90_bf16(problem, choice.config, stream);
    }
#endif
  } else if (half) {
    conv2d_cutlass_fp16(problem, choice.config, stream);
  } else {
    conv2d_cutlass_bf16(problem, choice.config, stream);
  }
  if (!out_in_place) {
    out_nhwc.copy_(target);
  }
  if (preact && !preact_target.is_same(preact_nhwc)) {
    preact_nhwc.copy_(preact_target);
  }
}

void conv2d_bias_act_out_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, int64_t config,
                              at::Tensor& out) {
  run_conv2d(x, weight, bias, residual, stride, padding, dilation, relu, config, out, nullptr);
}

void conv2d_preact_out_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& scale, const at::Tensor& shift,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t config,
                            at::Tensor& out, at::Tensor& out_preact) {
  const PreactOutput preact{scale, shift, out_preact};
  run_conv2d(x, weight, bias, residual, stride, padding, dilation, /*relu=*/false, config, out, &preact);
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
  m.impl("conv2d_preact_out", &conv2d_preact_out_cuda);
}

}  // namespace fused_resnet
