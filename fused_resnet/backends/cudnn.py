"""The cuDNN backend: PyTorch's own fused cuDNN ops (conv + bias + ReLU, conv + bias + add + ReLU).

It is the strongest library baseline on NVIDIA GPUs, so "auto" keeps it as a candidate and the
benchmarks use it as the "cuDNN fused" peer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "cudnn"


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "cuDNN runs on CUDA tensors only"
    if not torch.backends.cudnn.is_available():
        return "this PyTorch build has no cuDNN"
    return None


def conv_unsupported_reason(call) -> str | None:
    if call.x.dtype == torch.float64:
        return "cuDNN's fused convolutions take float16, bfloat16 or float32"
    return None


def conv2d_bias_act(out, call):
    x, weight, bias, residual, relu = call.x, call.weight, call.bias, call.residual, call.relu
    stride, padding, dilation, groups = call.conv_arguments
    memory_format = torch.channels_last
    x = x.contiguous(memory_format=memory_format)
    weight = weight.contiguous(memory_format=memory_format)
    if relu and residual is not None:
        y = torch.cudnn_convolution_add_relu(
            x, weight, residual.contiguous(memory_format=memory_format), 1.0, bias, stride, padding, dilation, groups
        )
    elif relu:
        y = torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    else:  # no fused cuDNN op without the activation: conv with bias, then the add
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if residual is not None:
            y = y.add_(residual)
    return y


def preact_unsupported_reason(call) -> str | None:
    return "cuDNN's fused convolutions have one output, not a second, pre-activated one"


def conv2d_preact(out, out_preact, call):
    raise NotImplementedError(preact_unsupported_reason(call))


def add_relu_unsupported_reason(x, y) -> str | None:
    return "cuDNN has no elementwise add + ReLU"


def add_relu(out, x, y) -> None:
    raise NotImplementedError("cuDNN has no elementwise add + ReLU")
