"""One description of a fused-op call: its arguments, and the key by which per-layer memos find it.

Validation, dispatch, the self-check, autotuning and the backends' caches all speak of a conv call
through a ConvCall, so its arguments travel as one value and every memo keys a layer the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor


def metadata(t: Tensor | None) -> tuple | None:
    """What the checks and the backends' choices depend on in a tensor: never its values."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.layout)


def _pair(value) -> tuple:
    return (value, value) if isinstance(value, (int, torch.SymInt)) else tuple(value)


@dataclass(frozen=True, eq=False)
class ConvCall:
    """conv2d(x, weight, stride, padding, dilation, groups) + bias [+ residual], then ReLU if `relu`;
    with `scale` and `shift` (conv2d_preact) also z = relu(y * scale + shift) per output channel."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    residual: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    relu: bool = True
    scale: Tensor | None = None
    shift: Tensor | None = None

    @classmethod
    def of(cls, x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1, relu=True,
           scale=None, shift=None) -> ConvCall:
        """A call from F.conv2d-style arguments: stride, padding and dilation as ints or pairs."""
        return cls(x, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation), groups, relu, scale, shift)

    @property
    def preact(self) -> bool:
        return self.scale is not None

    @property
    def op(self) -> str:
        return "conv2d_preact" if self.preact else "conv2d_bias_act"

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def conv_arguments(self) -> tuple:
        """(stride, padding, dilation, groups), as F.conv2d takes them after weight and bias."""
        return self.stride, self.padding, self.dilation, self.groups

    @functools.cached_property
    def key(self) -> tuple:
        """The layer: everything but the tensors' values. Equal keys make equal checks and choices."""
        tensors = (self.x, self.weight, self.bias, self.residual, self.scale, self.shift)
        return (self.op, *map(metadata, tensors), *self.conv_arguments, self.relu)

    def describe(self) -> str:
        """The key as readable text, for warnings and the autotune file."""
        shapes = " ".join("-" if t is None else f"{tuple(t.shape)}/{t.stride()}" for t in (self.x, self.weight, self.bias, self.residual))
        dtype = str(self.x.dtype).removeprefix("torch.")
        return f"{self.op} {dtype} {shapes} {' '.join(map(str, self.conv_arguments))} relu={self.relu}"

    def replace(self, **changes) -> ConvCall:
        return dataclasses.replace(self, **changes)

    def in_dtype(self, dtype: torch.dtype) -> ConvCall:
        """The same call on every tensor cast to `dtype` (the float64 reference of the parity rule)."""
        fields = ("x", "weight", "bias", "residual", "scale", "shift")
        return self.replace(**{f: None if getattr(self, f) is None else getattr(self, f).to(dtype) for f in fields})


@dataclass(frozen=True, eq=False)
class AddReluCall:
    """relu(x + y) for two tensors of one shape."""

    x: Tensor
    y: Tensor
    op = "add_relu"

    @property
    def device(self) -> torch.device:
        return self.x.device

    @functools.cached_property
    def key(self) -> tuple:
        return (self.op, metadata(self.x), metadata(self.y))

    def describe(self) -> str:
        return f"add_relu {str(self.x.dtype).removeprefix('torch.')} {tuple(self.x.shape)}/{self.x.stride()} {self.y.stride()}"

    def in_dtype(self, dtype: torch.dtype) -> AddReluCall:
        return AddReluCall(self.x.to(dtype), self.y.to(dtype))
