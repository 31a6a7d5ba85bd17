"""The Triton backend: an implicit-GEMM convolution with a fused epilogue (conv.py) and an
elementwise add + ReLU (add_relu_kernel.py; not add_relu.py, which would shadow add_relu below)."""

from __future__ import annotations

import torch

from .runtime import interpreting

NAME = "triton"


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return "Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"


# The kernel modules import triton, which may be missing: load them only once a call needs them.


def conv_unsupported_reason(call) -> str | None:
    from . import conv

    return conv.unsupported_reason(call.x, call.weight, *call.conv_arguments)


def conv2d_bias_act(out, call) -> None:
    from . import conv

    conv.conv2d_bias_act(out, call.x, call.weight, call.bias, call.residual, *call.conv_arguments, call.relu)


def preact_unsupported_reason(call) -> str | None:
    return conv_unsupported_reason(call)


def conv2d_preact(out, out_preact, call) -> None:
    from . import conv

    conv.conv2d_preact(out, out_preact, call.x, call.weight, call.bias, call.residual, call.scale, call.shift, *call.conv_arguments)


def add_relu_unsupported_reason(x, y) -> str | None:
    from . import add_relu_kernel

    return add_relu_kernel.unsupported_reason(x, y)


def add_relu(out, x, y) -> None:
    from . import add_relu_kernel

    add_relu_kernel.add_relu(out, x, y)
