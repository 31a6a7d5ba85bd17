// Folding a BatchNorm's scale into a conv weight on the CPU: each output channel's weights times that
// channel's scale, the product taken in float64 and rounded once to float32.
//
// fused_resnet/fold.py computes W' = W * s in float64 (s = gamma / sqrt(running_var + eps) is float64).
// With ATen that is three passes over every weight, each into new memory: the float64 copy, the
// product, the cast back. Here it is one: read a float32, widen, multiply, round, write. Widening is
// exact and the product and its rounding are the same IEEE operations, so the result is bit for bit
// what the three passes give.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fused_resnet {
namespace {

// The fewest weights worth a thread of their own (ATen's grain size for elementwise loops).
constexpr int64_t kElementsPerThread = 32768;

at::Tensor scale_output_channels(const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.device().is_cpu() && scale.device().is_cpu(), "fused_resnet_cpu::scale_output_channels: expected CPU tensors");
  // Each output channel's weights must lie in one dense block (NCHW or channels_last order inside it):
  // then the blocks are scaled in memory order, and the result keeps the weight's strides.
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() >= 1 && weight.is_non_overlapping_and_dense() &&
                  (weight.size(0) == 1 || weight.stride(0) * weight.size(0) == weight.numel()),
              "fused_resnet_cpu::scale_output_channels: expected a dense float32 weight with each output channel's "
              "weights in one block, got ", weight.scalar_type(), " with sizes ", weight.sizes(), " and strides ",
              weight.strides());
  TORCH_CHECK(scale.scalar_type() == at::kDouble && scale.dim() == 1 && scale.size(0) == weight.size(0) && scale.is_contiguous(),
              "fused_resnet_cpu::scale_output_channels: expected a contiguous float64 scale of ", weight.size(0),
              " elements (one per output channel), got ", scale.scalar_type(), " with sizes ", scale.sizes());
  at::Tensor out = at::empty_strided(weight.sizes(), weight.strides(), weight.options());
  const int64_t channels = weight.size(0);
  if (out.numel() == 0) return out;
  const int64_t per_channel = weight.numel() / channels;
  const float* w = weight.const_data_ptr<float>();
  const double* s = scale.const_data_ptr<double>();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kElementsPerThread / std::max<int64_t>(per_channel, 1));
  at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double factor = s[c];
      const float* src = w + c * per_channel;
      float* dst = o + c * per_channel;
      for (int64_t i = 0; i < per_channel; ++i) dst[i] = static_cast<float>(static_cast<double>(src[i]) * factor);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_resnet_cpu, m) {
  m.def("scale_output_channels(Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet_cpu, CPU, m) {
  m.impl("scale_output_channels", &scale_output_channels);
}

}  // namespace fused_resnet
