"""The Triton backend: an implicit-GEMM convolution with a fused epilogue (conv.py) and an
elementwise add + ReLU (add_relu_kernel.py; not add_relu.py, which would shadow add_relu below)."""

from __future__ import annotations

import contextlib
import os

import torch

NAME = "triton"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return None
    return "Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"


def on_device_of(t: torch.Tensor):
    """Makes t's GPU the current device for a launch: Triton launches on the current device's
    stream, so a tensor on another GPU than the current one would be read on the wrong device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The kernel modules import triton, which may be missing: load them only once a call needs them.


def conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None:
    from . import conv

    return conv.unsupported_reason(x, weight, stride, padding, dilation, groups)


def conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> None:
    from . import conv

    conv.conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu)


def preact_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None:
    return conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups)


def conv2d_preact(out, out_preact, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups) -> None:
    from . import conv

    conv.conv2d_preact(out, out_preact, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)


def add_relu_unsupported_reason(x, y) -> str | None:
    from . import add_relu_kernel

    return add_relu_kernel.unsupported_reason(x, y)


def add_relu(out, x, y) -> None:
    from . import add_relu_kernel

    add_relu_kernel.add_relu(out, x, y)
