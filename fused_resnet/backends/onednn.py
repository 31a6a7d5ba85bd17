"""The oneDNN backend (CPU): each fused conv is one oneDNN convolution with its bias and residual sum
as post-ops, on a weight reordered once into oneDNN's blocked layout; ReLU follows in place.

It calls the operators PyTorch ships for Inductor's CPU freezing path:
`mkldnn._reorder_convolution_weight` (the prepacking) and `mkldnn._convolution_pointwise` (its
`.binary` overload adds the residual). Threads are ATen's: `torch.get_num_threads()`.

The packed weight is a cache this module keeps beside the weight tensor, never a parameter or a
buffer, so it cannot land in a state_dict or an exported program. It is keyed weakly by the weight
tensor and stamped with what a change of the weights changes: the version counter (bumped by
in-place edits, `load_state_dict`, `copy_`), the data pointer and dtype (`.to(dtype)` swaps a
parameter's data and keeps its version), shape and strides. Edits through `weight.data`, which
bypass the version counter, are not seen: re-fuse or use in-place ops on the parameter itself.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import cpu_isa
from .reference import add_relu  # noqa: F401  (oneDNN has no standalone add + ReLU; ATen's vectorised kernels serve it)
from .reference import preact

NAME = "onednn"
ALLOCATES_OUTPUT = True  # oneDNN's operators return new tensors
WRITES_INTO_RESIDUAL = True  # through the in-place overload, the sum post-op on the residual's memory

# Each weight keeps packed copies for this many input shapes (oneDNN picks the blocked layout for the
# shape); older ones are dropped so that inputs of ever-changing size cannot grow memory without bound.
MAX_SHAPES_PER_WEIGHT = 4

_convolution = torch.ops.mkldnn._convolution_pointwise.default
_convolution_add = torch.ops.mkldnn._convolution_pointwise.binary
_convolution_add_into_residual = torch.ops.mkldnn._convolution_pointwise_.binary
_reorder_weight = torch.ops.mkldnn._reorder_convolution_weight.default

# weight tensor -> (stamp of the weight's contents, {(input shape, conv arguments): packed weight})
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
# How many convolutions this backend has computed: lets tests check it served a call.
calls = 0


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "oneDNN convolutions run on CPU tensors only"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    return None


def conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None:
    return _dtype_unsupported_reason(x.dtype)


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


def _stamp(weight: torch.Tensor) -> tuple:
    return weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride()


def packed_weight(weight, input_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout for this input shape and conv, reordered on first use."""
    if weight.is_inference():
        # Inference tensors have no version counter, so a cached copy could go stale unseen: oneDNN
        # reads the plain weight instead (correct, a little slower).
        return weight.contiguous()
    stamp = _stamp(weight)
    entry = _packed.get(weight)
    if entry is None or entry[0] != stamp:
        entry = _packed[weight] = (stamp, {})
    by_shape = entry[1]
    key = (tuple(input_shape), tuple(stride), tuple(padding), tuple(dilation), groups)
    packed = by_shape.get(key)
    if packed is None:
        if len(by_shape) >= MAX_SHAPES_PER_WEIGHT:
            del by_shape[next(iter(by_shape))]
        packed = by_shape[key] = _reorder_weight(weight.contiguous(), padding, stride, dilation, groups, list(input_shape))
    return packed


def _is_channels_last(t: torch.Tensor) -> bool:
    """Whether `t` is laid out exactly as a dense channels_last tensor, strides and all. (is_contiguous
    is not enough: a tensor whose size-1 dimensions make both layouts valid may carry NCHW strides, and
    oneDNN takes the layout from the strides.)"""
    n, c, h, w = t.shape
    return t.stride() == (h * w * c, 1, w * c, c)


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if _is_channels_last(t) else torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


def conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu):
    global calls
    calls += 1
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
    # the input would silently vanish. ATen's ReLU runs in place on the just-written output instead.
    return y.relu_() if relu else y


def preact_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None:
    return _dtype_unsupported_reason(x.dtype)


def conv2d_preact(out, out_preact, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups):
    # A oneDNN convolution has one output, so z is computed from y once it is written: ATen's addcmul
    # writes it in one pass and ReLU runs in place on it. (One pass would be a depthwise 1x1 oneDNN
    # convolution with a ReLU post-op, but that post-op maps NaN to 0 where torch.relu keeps it.)
    y = conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu=False)
    return y, preact(y, scale, shift, out=out_preact)


def add_relu_unsupported_reason(x, y) -> str | None:
    return None
