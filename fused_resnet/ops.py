"""The fused ops, registered through torch.library so that autograd, torch.compile and torch.export see them.

    conv2d_bias_act(x, weight, bias, residual) = act(conv2d(x, weight) + bias + residual)
    conv2d_preact(x, weight, bias, residual, scale, shift) = (y, z) with
        y = conv2d(x, weight) + bias + residual    (a pre-activation ResNet's residual stream)
        z = relu(y * scale + shift)                (the next block's BatchNorm + ReLU, folded to an affine map)
    add_relu(x, y)                             = relu(x + y)

Each op validates its arguments, describes the call (fused_resnet.call) and hands it to
fused_resnet.dispatch, which picks a backend and lets it write the output. The conv output is always
channels_last: the fused network converts its input once at the entry and stays in that layout
between layers. The derivatives are in fused_resnet.derivatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import backends, derivatives, dispatch
from .backends import reference
from .backends.weight_cache import DerivedWeights
from .call import AddReluCall, ConvCall
from .validation import check_add_relu, check_conv, check_preact, check_types, pair


def _by_composite(*tensors: Tensor | None) -> bool:
    """Whether the call runs under a transform our ops have no rule for: forward-mode AD (its dual
    tensors, or torch.func.jvp) and the other torch.func transforms (vmap, grad, jvp). Then the op is
    computed by the aten ops it stands for, which every transform knows: never a zero tangent."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


# Cast weights and biases for autocast, kept per source tensor (a new cast each call would also be a
# new tensor for the backends' caches of packed weights to pack again).
_autocast_copies = DerivedWeights(per_weight=2)


def _autocast(x: Tensor, *tensors: Tensor | None) -> tuple:
    """The op's tensors as autocast casts a convolution's: in an autocast region of x's device type,
    every floating tensor but a float64 one in the autocast dtype (eager's conv2d is on autocast's
    lower-precision list on the CPU and on CUDA); unchanged elsewhere."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None, kept: bool) -> Tensor | None:
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        if kept and isinstance(t, torch.nn.Parameter) and not torch.is_grad_enabled():
            return _autocast_copies.get(t, dtype, lambda: t.detach().to(dtype))
        return t.to(dtype)

    # A region's casts are not recorded for autograd on the parameters' side when no gradient is taken.
    return (cast(x, False), *(cast(t, True) for t in tensors))


def has_global_hooks() -> bool:
    """Whether a global module hook of any kind (forward, pre, backward) is registered."""
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks or m._global_backward_pre_hooks)


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether `module` itself has a hook of any kind (forward, pre, backward), which a call that skips
    its `__call__` would not run."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def plain_eager_call(*tensors: Tensor | None) -> bool:
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

# Validated calls: the output shape and the call as the backends get it, by the call's metadata
# (shapes, strides, dtypes, devices, arguments), on which the checks depend alone. A layer called
# again skips them.
_validated: dict[tuple, tuple] = {}
MAX_VALIDATED = 4096  # more distinct calls than any model makes; inputs of ever-new sizes start afresh


def effective_dilation(weight: Tensor, dilation: Sequence[int]) -> tuple[int, ...]:
    """Dilation along a kernel axis of size 1 changes nothing, and oneDNN's bfloat16 channels_last conv
    crashes on some such shapes (eager F.conv2d as well): every backend gets it as 1."""
    return tuple(1 if k == 1 else d for k, d in zip(weight.shape[2:], dilation))


def _validated_call(call: ConvCall, backend: str) -> tuple[ConvCall, tuple]:
    """(the call as the backends get it, its output shape), or the exception the call deserves."""
    key = (call.key, backend)
    validated = _validated.get(key)
    if validated is None:
        backends.check_name(backend)
        check = check_preact if call.preact else check_conv
        shape = check(call)
        call_for_backends = call.replace(dilation=effective_dilation(call.weight, call.dilation))
        if len(_validated) >= MAX_VALIDATED:
            _validated.clear()
        validated = _validated[key] = (call_for_backends.dilation, shape)
    dilation, shape = validated
    return (call if dilation == call.dilation else call.replace(dilation=dilation)), shape


def _run_conv2d_bias_act(call: ConvCall, backend: str, residual_writable: bool = False) -> Tensor:
    call, shape = _validated_call(call, backend)
    return dispatch.conv2d_bias_act(call, shape, backend, residual_writable)


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
    return _run_conv2d_bias_act(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu), backend)


_conv2d_bias_act = torch.library.custom_op("fused_resnet::conv2d_bias_act", mutates_args=())(_compute_conv2d_bias_act)


@_conv2d_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    backends.check_name(backend)
    shape = check_conv(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu, _ = inputs
    derivatives.conv_setup_context(ctx, x, weight, bias, residual, stride, padding, dilation, groups, relu, output)


def _conv_backward(ctx, grad):
    return (*derivatives.conv_backward(ctx, grad), None, None, None, None, None, None)


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
    call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, False, scale, shift)
    call, shape = _validated_call(call, backend)
    return dispatch.conv2d_preact(call, shape, backend)


_conv2d_preact = torch.library.custom_op("fused_resnet::conv2d_preact", mutates_args=())(_compute_conv2d_preact)


@_conv2d_preact.register_fake
def _(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend):
    backends.check_name(backend)
    shape = check_preact(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, False, scale, shift))
    return tuple(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for _ in "yz")


def _preact_setup_context(ctx, inputs, output):
    x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, _ = inputs
    derivatives.preact_setup_context(ctx, x, weight, bias, residual, scale, stride, padding, dilation, groups, output)


def _preact_backward(ctx, grad_y, grad_z):
    return (*derivatives.preact_backward(ctx, grad_y, grad_z), None, None, None, None, None)


_conv2d_preact.register_autograd(_preact_backward, setup_context=_preact_setup_context)


def _compute_add_relu(x: Tensor, y: Tensor, backend: str) -> Tensor:
    backends.check_name(backend)
    check_add_relu(x, y)
    return dispatch.add_relu(AddReluCall(x, y), backend)


_add_relu = torch.library.custom_op("fused_resnet::add_relu", mutates_args=())(_compute_add_relu)


@_add_relu.register_fake
def _(x, y, backend):
    backends.check_name(backend)
    check_add_relu(x, y)
    return torch.empty_like(x)


def _add_relu_setup_context(ctx, inputs, output):
    derivatives.add_relu_setup_context(ctx, output)


def _add_relu_backward(ctx, grad):
    return (*derivatives.add_relu_backward(ctx, grad), None)


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
    `backend` is one of fused_resnet.backends.NAMES ("cuda", "triton", "cudnn", "onednn", "torch") or
    "auto", or backends.verified(name) to check the named backend's result on each layer's first call.
    `residual_writable=True` says the caller will not read `residual` again: in a plain eager call a
    backend may then write the result over it (the oneDNN backend does), instead of into new memory.
    """
    check_types(
        dict(x=x, weight=weight), dict(bias=bias, residual=residual),
        groups=groups, relu=relu, backend=backend, residual_writable=residual_writable,
    )
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    x, weight, bias, residual = _autocast(x, weight, bias, residual)
    if _by_composite(x, weight, bias, residual):
        call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu)
        check_conv(call)
        return reference.conv2d_bias_act(None, call)
    if plain_eager_call(x, weight, bias, residual):
        call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, relu)
        return _run_conv2d_bias_act(call, backend, residual_writable=residual_writable and residual is not None)
    return _conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)


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
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    x, weight, bias, residual, scale, shift = _autocast(x, weight, bias, residual, scale, shift)
    if _by_composite(x, weight, bias, residual, scale, shift):
        call = ConvCall.of(x, weight, bias, residual, stride, padding, dilation, groups, False, scale, shift)
        check_preact(call)
        return reference.conv2d_preact(None, None, call)
    op = _compute_conv2d_preact if plain_eager_call(x, weight, bias, residual, scale, shift) else _conv2d_preact
    return op(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend)


def add_relu(x: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """relu(x + y) for two tensors of one shape, dtype and device."""
    check_types(dict(x=x, y=y), backend=backend)
    if _by_composite(x, y):
        check_add_relu(x, y)
        return torch.relu(x + y)
    return (_compute_add_relu if plain_eager_call(x, y) else _add_relu)(x, y, backend)



def forget(tensors) -> None:
    """Drops what the ops and the backends keep derived from these tensors (autocast casts, packed weights)."""
    tensors = list(tensors)
    for tensor in tensors:
        _autocast_copies.forget(tensor)
    dispatch.forget(tensors)
