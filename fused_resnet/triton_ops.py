"""The Triton kernels as torch.library ops that carry their kernels into compiled graphs.

    fused_resnet_triton::conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    fused_resnet_triton::conv2d_preact(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)
    fused_resnet_triton::add_relu(x, y)

The ops of fused_resnet.ops pick a backend in Python on every call, so a graph that holds them can
only call back into Python. These ops are registered with torch.library.triton_op and launch through
torch.library.wrap_triton: when AOTInductor (or torch.compile) lowers a graph that holds them, it
sees the Triton kernels themselves and compiles them into its output. An AOTInductor package made
from a program exported with `export_program(..., lower_to="triton")` thus runs our kernels without
fused_resnet installed.

They compute what the fused ops compute, with the Triton backend, and take already validated
arguments: export_program routes the fused ops to them (fused_resnet.export). A case the kernel does
not serve is computed with aten ops inside the op, so that it lowers too, and warns like every other
fallback (fused_resnet.dispatch.fall_back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import backends, dispatch
from .backends import reference
from .backends.triton import NAME, add_relu_kernel, conv
from .call import ConvCall
from .validation import check_conv, check_preact


def _poisoned(out: Tensor) -> Tensor:
    return out.fill_(float("nan")) if dispatch.POISON_OUTPUTS else out


@torch.library.triton_op("fused_resnet_triton::conv2d_bias_act", mutates_args=())
def conv2d_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> Tensor:
    call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    shape = check_conv(call)
    reason = conv.unsupported_reason(x, weight, stride, padding, dilation, groups)
    if reason is not None:
        dispatch.fall_back(NAME, "convolution", reason)
        dispatch.note_serving(reference)
        return reference.conv2d_bias_act(None, call).contiguous(memory_format=torch.channels_last)
    dispatch.note_serving(backends.get(NAME))
    out = _poisoned(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last))
    if out.numel():
        # No cached weight copy here (gemm_weight keys on data pointers, which tracing has not):
        # a fused model's weights are channels_last, for which this is a view.
        w = weight.permute(0, 2, 3, 1).contiguous()
        x = x.contiguous(memory_format=torch.channels_last)
        conv.launch(out, x, w, bias, residual, stride, padding, dilation, groups, relu, traceable=True)
    return out


@torch.library.triton_op("fused_resnet_triton::conv2d_preact", mutates_args=())
def conv2d_preact(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[Tensor, Tensor]:
    call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, False, scale, shift)
    shape = check_preact(call)
    reason = conv.unsupported_reason(x, weight, stride, padding, dilation, groups)
    if reason is not None:
        dispatch.fall_back(NAME, "convolution with a pre-activation output", reason)
        dispatch.note_serving(reference)
        y, z = reference.conv2d_preact(None, None, call)
        return y.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    dispatch.note_serving(backends.get(NAME))
    y, z = (_poisoned(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)) for _ in "yz")
    if y.numel():
        w = weight.permute(0, 2, 3, 1).contiguous()  # as in conv2d_bias_act above
        x = x.contiguous(memory_format=torch.channels_last)
        preact = conv.Preact(scale.contiguous(), shift.contiguous(), z)
        conv.launch(y, x, w, bias, residual, stride, padding, dilation, groups, False, preact=preact, traceable=True)
    return y, z


@torch.library.triton_op("fused_resnet_triton::add_relu", mutates_args=())
def add_relu(x: Tensor, y: Tensor) -> Tensor:
    out = _poisoned(torch.empty_like(x))
    reason = add_relu_kernel.unsupported_reason(x, y)
    if reason is not None:
        dispatch.fall_back(NAME, "add_relu", reason)
        dispatch.note_serving(reference)
        return out.copy_(torch.relu(x + y))
    dispatch.note_serving(backends.get(NAME))
    if out.numel():
        add_relu_kernel.add_relu(out, x, y, traceable=True)
    return out


# triton_op makes the op's own body its fake implementation, which launches the kernel. Under
# TRITON_INTERPRET=1, wrap_triton cannot trace the interpreter's kernels, so torch.export (which runs
# fake implementations) would launch them on fake tensors: give both ops shape-only fakes instead.
@conv2d_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    shape = check_conv(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@conv2d_preact.register_fake
def _(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups):
    shape = check_preact(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, False, scale, shift))
    return tuple(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for _ in "yz")


@add_relu.register_fake
def _(x, y):
    return torch.empty_like(x)
