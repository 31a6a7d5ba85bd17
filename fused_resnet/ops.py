"""The fused ops, registered through torch.library so that autograd, torch.compile and torch.export see them.

    conv2d_bias_act(x, weight, bias, residual) = act(conv2d(x, weight) + bias + residual)
    conv2d_preact(x, weight, bias, residual, scale, shift) = (y, z) with
        y = conv2d(x, weight) + bias + residual    (a pre-activation ResNet's residual stream)
        z = relu(y * scale + shift)                (the next block's BatchNorm + ReLU, folded to an affine map)
    add_relu(x, y)                             = relu(x + y)

Each op validates its arguments, picks a backend (see fused_resnet.backends) and lets it write a
freshly allocated output. The conv output is always channels_last: the fused network converts its
input once at the entry and stays in that layout between layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .validation import check_add_relu, check_conv, check_preact, check_types, pair

# When True, outputs are filled with NaN before a backend writes them, so an element a kernel
# forgets to write shows up as NaN downstream. For tests and debugging; it costs a fill per op.
POISON_OUTPUTS = False


def _new_output(x: Tensor, shape) -> Tensor:
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _plain_eager_call(*tensors: Tensor | None) -> bool:
    """True when nothing but the caller sees this call: no autograd to record, no tracer, compiler,
    dispatch or function mode, functorch transform or forward-mode AD, and plain tensors only.

    Then the public functions call the op's implementation directly, which is all the dispatcher
    would end up doing, without its cost: tens of microseconds a call, a visible share of a ResNet
    at batch 1 on the CPU. Anything that needs to see the op (torch.compile, torch.export, ONNX
    export, autograd, FakeTensor) still goes through the dispatcher.
    """
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    ):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _channels_last_strides(shape) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# Validated calls: the output shape and the dilation as the backends get it, by the call's metadata
# (shapes, strides, dtypes, devices, arguments), on which the checks depend alone. A layer called
# again skips them.
_validated: dict[tuple, tuple] = {}
MAX_VALIDATED = 4096  # more distinct calls than any model makes; inputs of ever-new sizes start afresh


def _metadata(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.layout)


def _validate_conv(x, weight, bias, residual, stride, padding, dilation, groups, backend) -> tuple:
    """(output shape, dilation as the backends get it) for a conv call, or the exception it deserves."""
    key = (
        _metadata(x), _metadata(weight), _metadata(bias), _metadata(residual),
        tuple(stride), tuple(padding), tuple(dilation), groups, backend,
    )  # fmt: skip
    validated = _validated.get(key)
    if validated is None:
        backends.check_name(backend)
        shape = check_conv(x, weight, bias, residual, stride, padding, dilation, groups)
        dilation = _effective_dilation(weight, dilation)
        if len(_validated) >= MAX_VALIDATED:
            _validated.clear()
        validated = _validated[key] = (shape, dilation)
    return validated


def _run_conv2d_bias_act(
    x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, residual_writable=False
) -> Tensor:
    """The op's computation (its arguments as in _compute_conv2d_bias_act), for one backend's call."""
    shape, dilation = _validate_conv(x, weight, bias, residual, stride, padding, dilation, groups, backend)
    if 0 in shape:
        return _new_output(x, shape)
    chosen = backends.select_conv(backend, x, weight, bias, residual, stride, padding, dilation, groups, relu, shape)
    if (
        residual_writable
        and getattr(chosen, "WRITES_INTO_RESIDUAL", False)
        and residual.stride() == _channels_last_strides(shape)
        and not _shares_memory(residual, x)
    ):
        out = residual  # a new output's pages would be faulted in afresh on each call; the residual's are warm
    else:
        out = backends.preallocated(chosen, lambda: _new_output(x, shape))
    result = chosen.conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu)
    return _as_output(result, out, x, shape)


def _compute_conv2d_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    backend: str,
) -> Tensor:
    return _run_conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)


def _effective_dilation(weight: Tensor, dilation: Sequence[int]) -> list[int]:
    """Dilation along a kernel axis of size 1 changes nothing, and oneDNN's bfloat16 channels_last conv
    crashes on some such shapes (eager F.conv2d as well): every backend gets it as 1."""
    return [1 if k == 1 else d for k, d in zip(weight.shape[2:], dilation)]


def _as_output(result: Tensor | None, out: Tensor | None, x: Tensor, shape) -> Tensor:
    """What a backend computed, as the op's channels_last output of `shape`: `out` when the backend
    wrote it, the backend's own tensor when it is channels_last, else a channels_last copy of it."""
    if result is None or result is out:
        return out
    if result.stride() == _channels_last_strides(shape):
        return result
    return (_new_output(x, shape) if out is None else out).copy_(result)


_conv2d_bias_act = torch.library.custom_op("fused_resnet::conv2d_bias_act", mutates_args=())(_compute_conv2d_bias_act)


@_conv2d_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    backends.check_name(backend)
    shape = check_conv(x, weight, bias, residual, stride, padding, dilation, groups)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu, _ = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _conv_backward(ctx, grad):
    x, weight, output = ctx.saved_tensors
    if output is not None:
        grad = grad * (output > 0)
    return (*_conv_backward_from(ctx, grad, x, weight), None, None, None, None, None, None)


def _conv_backward_from(ctx, grad, x, weight) -> tuple:
    """The gradients of x, weight, bias and residual, given the gradient of conv2d(x, weight) + bias + residual."""
    stride, padding, dilation, groups = ctx.conv_args
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    grad_x = grad_w = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
        )
    grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    grad_r = grad if ctx.has_residual and need_r else None
    return grad_x, grad_w, grad_b, grad_r


_conv2d_bias_act.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def _compute_conv2d_preact(
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
    backend: str,
) -> tuple[Tensor, Tensor]:
    backends.check_name(backend)
    shape = check_preact(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)
    out_preact = _new_output(x, shape)
    if out_preact.numel() == 0:
        return _new_output(x, shape), out_preact
    dilation = _effective_dilation(weight, dilation)
    args = (x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)
    chosen = backends.select_preact(backend, *args, out_preact)
    out = backends.preallocated(chosen, lambda: _new_output(x, shape))
    result = chosen.conv2d_preact(out, out_preact, *args)
    if result is None:
        return out, out_preact
    return _as_output(result[0], out, x, shape), _as_output(result[1], out_preact, x, shape)


_conv2d_preact = torch.library.custom_op("fused_resnet::conv2d_preact", mutates_args=())(_compute_conv2d_preact)


@_conv2d_preact.register_fake
def _(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend):
    backends.check_name(backend)
    shape = check_preact(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)
    return tuple(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for _ in "yz")


def _preact_setup_context(ctx, inputs, output):
    x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(x, weight, scale, *output)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _preact_backward(ctx, grad_y, grad_z):
    x, weight, scale, y, z = ctx.saved_tensors
    # Through z = relu(y * scale + shift): where z > 0 its gradient reaches y (times scale), scale and shift.
    grad_affine = grad_z * (z > 0)
    need_scale, need_shift = ctx.needs_input_grad[4:6]
    grad_scale = (grad_affine * y).sum((0, 2, 3)) if need_scale else None
    grad_shift = grad_affine.sum((0, 2, 3)) if need_shift else None
    grad = grad_y + grad_affine * scale[:, None, None]
    grad_x, grad_w, grad_b, grad_r = _conv_backward_from(ctx, grad, x, weight)
    return grad_x, grad_w, grad_b, grad_r, grad_scale, grad_shift, None, None, None, None, None


_conv2d_preact.register_autograd(_preact_backward, setup_context=_preact_setup_context)


def _compute_add_relu(x: Tensor, y: Tensor, backend: str) -> Tensor:
    backends.check_name(backend)
    check_add_relu(x, y)
    out = torch.empty_like(x)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if out.numel():
        backends.select_add_relu(backend, x, y).add_relu(out, x, y)
    return out


_add_relu = torch.library.custom_op("fused_resnet::add_relu", mutates_args=())(_compute_add_relu)


@_add_relu.register_fake
def _(x, y, backend):
    backends.check_name(backend)
    check_add_relu(x, y)
    return torch.empty_like(x)


def _add_relu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad):
    (output,) = ctx.saved_tensors
    grad = grad * (output > 0)
    return grad, grad, None


_add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup_context)


def conv2d_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    backend: str = "auto",
    residual_writable: bool = False,
) -> Tensor:
    """act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual), act = ReLU if `relu`.

    `x` may be NCHW or channels_last with any strides; the result is channels_last.
    `backend` is "torch", "triton", "cuda", "cudnn", "onednn" or "auto", or backends.verified(name) to check the
    named backend's result on each layer's first call.
    `residual_writable=True` says the caller will not read `residual` again: in a plain eager call a
    backend may then write the result over it (the oneDNN backend does), instead of into new memory.
    """
    check_types(
        dict(x=x, weight=weight), dict(bias=bias, residual=residual),
        groups=groups, relu=relu, backend=backend, residual_writable=residual_writable,
    )  # fmt: skip
    args = (
        x, weight, bias, residual, pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"),
        groups, relu, backend,
    )  # fmt: skip
    if _plain_eager_call(x, weight, bias, residual):
        return _run_conv2d_bias_act(*args, residual_writable=residual_writable and residual is not None)
    return _conv2d_bias_act(*args)


def conv2d_preact(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    scale: Tensor,
    shift: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(y, z): y = F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual, and
    z = relu(y * scale + shift) with `scale` and `shift` per output channel.

    In a pre-activation ResNet (v2), y is the residual stream and z the next block's BatchNorm + ReLU
    of it (fold.bn_scale_shift gives scale and shift): one pass computes both. Layouts and `backend`
    as for conv2d_bias_act; both results are channels_last.
    """
    check_types(dict(x=x, weight=weight, scale=scale, shift=shift), dict(bias=bias, residual=residual),
                groups=groups, backend=backend)
    op = _compute_conv2d_preact if _plain_eager_call(x, weight, bias, residual, scale, shift) else _conv2d_preact
    return op(
        x,
        weight,
        bias,
        residual,
        scale,
        shift,
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(dilation, "dilation"),
        groups,
        backend,
    )


def add_relu(x: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """relu(x + y) for two tensors of one shape, dtype and device."""
    check_types(dict(x=x, y=y), backend=backend)
    return (_compute_add_relu if _plain_eager_call(x, y) else _add_relu)(x, y, backend)
