// The per-channel vector of the CUTLASS 2.x pre-activation kernels (Conv2dProblem::preact_channels).

#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fused_resnet {

// A new (K, 4) float32 tensor on the current stream, row k = {bias[k] (0 without bias), scale[k],
// shift[k], 0}, from (K,) fp16 or bf16 vectors of any strides on x's device: one kernel launch.
at::Tensor pack_preact_channels(const std::optional<at::Tensor>& bias, const at::Tensor& scale, const at::Tensor& shift);

}  // namespace fused_resnet
