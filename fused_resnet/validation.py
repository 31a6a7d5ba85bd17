"""Argument checks for the fused ops, run before any backend sees the tensors.

Each failure names the argument, what it was and what is supported, so that a bad call never reaches
a kernel (where it could crash or read out of bounds): a TypeError for the wrong kind of argument or
dtype, a ValueError for a wrong shape, value or device.

The checks also run on fake tensors, when torch.compile or torch.export trace the ops with symbolic
sizes. They compare sizes with one another, and with constants only where every valid call agrees
(H, W >= 1): the batch size is never compared with a constant, so it stays symbolic, and may be 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .call import ConvCall

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def pair(value, name: str) -> list[int]:
    """An int or a pair of ints as a list of two ints."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)  # the modules' own attributes: checked in a fraction of the general path's time
    if isinstance(value, bool) or not isinstance(value, (int, Sequence, torch.SymInt)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, (int, torch.SymInt)):
        return [value, value]
    if (
        isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return list(value)


def check_types(
    tensors: dict, optional: dict | None = None, *, groups=1, relu=True, backend="auto", residual_writable=False
) -> None:
    """The kinds of the arguments of a public op, checked before the call reaches the dispatcher,
    which would otherwise reject a list or a string with a RuntimeError about the op's schema.

    `tensors` must be tensors; `optional` (bias, residual) tensors or None.
    """
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (optional or {}).items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        raise TypeError(f"groups must be an int, got {groups!r}")
    for name, flag in (("relu", relu), ("residual_writable", residual_writable)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, a backend's name or 'auto', got {backend!r}")


def _check_tensor(t: torch.Tensor, name: str, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (torch.strided) tensors are supported")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input x has dtype {like.dtype}; they must match")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input x is on {like.device}; they must be on one device")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_conv(call: ConvCall) -> tuple[int, int, int, int]:
    """Validates a conv2d_bias_act call and returns the output shape (N, Cout, OH, OW)."""
    x, weight, bias, residual = call.x, call.weight, call.bias, call.residual
    stride, padding, dilation, groups = call.conv_arguments
    _check_tensor(x, "x")
    _check_tensor(weight, "weight", like=x)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D (Cout, Cin/groups, R, S) tensor, got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    for name, values, least in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
        if len(values) != 2 or any(v < least for v in values):
            kind = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be a pair of {kind} ints, got {list(values)}")
    n, c, h, w = x.shape
    cout, cin_per_group, r, s = weight.shape
    if cout == 0 or cin_per_group == 0 or r == 0 or s == 0:
        # Eager PyTorch has no consistent answer here (a zero-channel input gives an output with
        # zero channels): refuse rather than pick one.
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} is empty; Cout, Cin/groups and the kernel size must be at least 1"
        )
    if c != cin_per_group * groups:
        raise ValueError(
            f"x has {c} channels but weight of shape {tuple(weight.shape)} with groups={groups} "
            f"expects {cin_per_group * groups} (= weight.shape[1] * groups)"
        )
    if cout % groups != 0:
        raise ValueError(f"weight has {cout} output channels, which groups={groups} does not divide")
    if h < 1 or w < 1:
        # Padding would give such an input a non-empty output made of bias alone; eager refuses it.
        raise ValueError(f"x of shape {tuple(x.shape)} has no pixels; H and W must be at least 1 (only N may be 0)")
    oh = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"kernel {r}x{s} with dilation {list(dilation)} is larger than the padded input "
            f"({h}x{w} with padding {list(padding)}): the output would be empty"
        )
    if bias is not None:
        _check_tensor(bias, "bias", like=x)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must have shape ({cout},) to match weight, got {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor(residual, "residual", like=x)
        if tuple(residual.shape) != (n, cout, oh, ow):
            raise ValueError(
                f"residual must have the output's shape {(n, cout, oh, ow)} (no broadcasting), "
                f"got {tuple(residual.shape)}"
            )
    return n, cout, oh, ow


def check_preact(call: ConvCall) -> tuple[int, int, int, int]:
    """Validates a conv2d_preact call (check_conv, and the pre-activation's per-channel affine map) and
    returns the shape of both outputs."""
    shape = check_conv(call)
    for name, t in (("scale", call.scale), ("shift", call.shift)):
        _check_tensor(t, name, like=call.x)
        if tuple(t.shape) != (shape[1],):
            raise ValueError(f"{name} must have shape ({shape[1]},), one value per output channel, got {tuple(t.shape)}")
    return shape


def check_add_relu(x, y) -> None:
    _check_tensor(x, "x")
    _check_tensor(y, "y", like=x)
    if x.shape != y.shape:
        raise ValueError(
            f"add_relu needs x and y of one shape (no broadcasting), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
