"""The oneDNN backend (CPU): each fused conv is one oneDNN convolution with its bias and residual sum
as post-ops, on a weight reordered once into oneDNN's blocked layout; ReLU follows in place.

It calls the operators PyTorch ships for Inductor's CPU freezing path:
`mkldnn._reorder_convolution_weight` (the prepacking) and `mkldnn._convolution_pointwise` (its
`.binary` overload adds the residual). Threads are ATen's: `torch.get_num_threads()`.

The packed weight is a cache this module keeps beside the weight tensor (backends/weight_cache.py:
never stale, with the edits it cannot see listed there), never a parameter or a buffer, so it cannot
land in a state_dict or an exported program. One packed copy serves every batch size: the key is the
input's channels and spatial size and the conv's arguments, which oneDNN's blocked weight layout
depends on.
"""

from __future__ import annotations

import functools

import torch

from .. import cpu_extension, cpu_isa, cpu_memory
from ..memory_format import channels_last_copy
from .reference import preact
from .weight_cache import DerivedWeights

NAME = "onednn"
ALLOCATES_OUTPUT = True  # oneDNN's operators return new tensors
WRITES_INTO_RESIDUAL = True  # through the in-place overload, the sum post-op on the residual's memory


_convolution = torch.ops.mkldnn._convolution_pointwise.default
_convolution_add = torch.ops.mkldnn._convolution_pointwise.binary
_convolution_add_into_residual = torch.ops.mkldnn._convolution_pointwise_.binary
_reorder_weight = torch.ops.mkldnn._reorder_convolution_weight.default


# Packed copies of each weight, for this many input sizes (channels, height, width) at most: inputs of
# ever-changing size cannot grow memory without bound.
MAX_SHAPES_PER_WEIGHT = 4
_packed = DerivedWeights(per_weight=MAX_SHAPES_PER_WEIGHT)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "oneDNN convolutions run on CPU tensors only"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    return None


def conv_unsupported_reason(call) -> str | None:
    return _dtype_unsupported_reason(call.x.dtype)


@functools.cache  # asked on every call; what oneDNN supports here never changes
def _dtype_unsupported_reason(dtype: torch.dtype) -> str | None:
    """torch's own checks decide (they ask oneDNN, so they follow its ONEDNN_MAX_CPU_ISA cap, and they
    guard the weight prepacking, which raises where they say no); cpu_isa says why."""
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return None
    return cpu_isa.missing_reason(dtype)


def packed_weight(weight, input_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout for inputs of this size and this conv, reordered on first use."""
    _, channels, height, width = input_shape
    key = (channels, height, width, tuple(stride), tuple(padding), tuple(dilation), groups)
    if weight.is_inference():  # no version counter: oneDNN reads the plain weight (correct, a little slower)
        return weight.contiguous()
    return _packed.get(
        weight, key, lambda: _reorder_weight(weight.contiguous(), padding, stride, dilation, groups, list(input_shape))
    )


def repacks() -> int:
    """How many packed copies were made so far (for benchmarks and tests)."""
    return _packed.made


def forget(weight: torch.Tensor) -> None:
    """Drops the packed copies of `weight`: the next call packs it afresh."""
    _packed.forget(weight)


def _is_channels_last(t: torch.Tensor) -> bool:
    """Whether `t` is laid out exactly as a dense channels_last tensor, strides and all. (is_contiguous
    is not enough: a tensor whose size-1 dimensions make both layouts valid may carry NCHW strides, and
    oneDNN takes the layout from the strides.)"""
    n, c, h, w = t.shape
    return t.stride() == (h * w * c, 1, w * c, c)


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if _is_channels_last(t) else channels_last_copy(t)


def conv2d_bias_act(out, call):
    cpu_memory.keep_freed_memory()  # once per process: activations reuse freed memory instead of new pages
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    stride, padding, dilation, groups = call.conv_arguments
    # oneDNN reads its operands as dense tensors of the layout their strides suggest: a view with gaps,
    # overlaps or a permuted order would be read out of bounds. The fused network is channels_last
    # throughout, so this copies nothing there.
    x = _as_channels_last(x)
    packed = packed_weight(weight, x.shape, stride, padding, dilation, groups)
    if bias is not None:
        bias = bias.contiguous()  # oneDNN reads the bias as dense: a strided view would give wrong sums
    sum_args = (packed, bias, padding, stride, dilation, groups, "add", 1.0, None, [None], "")
    if residual is not None and groups == 1 and _is_channels_last(residual):
        if out is residual:
            y = _convolution_add_into_residual(residual, x, *sum_args)
        else:
            y = _convolution_add(x, residual, *sum_args)
    else:  # no residual, or one the sum post-op cannot read as the output's layout: ATen adds it
        y = _convolution(x, packed, bias, padding, stride, dilation, groups, "none", [None], "")
        if residual is not None:
            y = residual.add_(y) if out is residual else y.add_(residual)
    # Not oneDNN's ReLU post-op: it maps NaN to 0 where eager's relu keeps NaN, so a NaN or Inf in
    # the input would silently vanish; so do the other post-ops that could stand for it, at AVX2 and
    # AVX-512 alike (tools/onednn_relu_postop.py). ReLU runs in place on the just-written output.
    return _relu_(y) if call.relu else y


def _relu_(y: torch.Tensor) -> torch.Tensor:
    """torch.relu in place, for every ReLU this backend applies. In bfloat16 and float16 the CPU
    extension's pass on the bits (csrc/cpu/relu_16bit.cpp) does it: ATen's widens every value to
    float32 and back, 4x slower. (Same values; a NaN's payload, which ATen's relu changes, may differ.)"""
    if y.dtype in (torch.bfloat16, torch.float16) and (y.is_contiguous(memory_format=torch.channels_last) or y.is_contiguous()):
        native = cpu_extension.ops()
        if native is not None:
            return native.relu_16bit_(y)
    return y.relu_()


def preact_unsupported_reason(call) -> str | None:
    return _dtype_unsupported_reason(call.x.dtype)


def conv2d_preact(out, out_preact, call):
    # A oneDNN convolution has one output, so z is computed from y once it is written: ATen's addcmul
    # writes it in one pass and ReLU runs in place on it. (One pass would be a depthwise 1x1 oneDNN
    # convolution with a ReLU post-op, but that post-op maps NaN to 0 where torch.relu keeps it.)
    y = conv2d_bias_act(out, call.replace(relu=False))
    return y, preact(y, call.scale, call.shift, out=out_preact, relu_=_relu_)


def add_relu_unsupported_reason(x, y) -> str | None:
    return None


def add_relu(out, x, y) -> None:
    # oneDNN has no standalone add + ReLU: ATen's vectorised add, then this backend's ReLU.
    _relu_(torch.add(x, y, out=out))
