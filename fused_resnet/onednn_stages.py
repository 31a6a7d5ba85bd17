"""Stages of fused residual blocks (a FusedResNet's four, or a FusedStage) as straight calls of oneDNN's
convolutions, on the CPU.

Through the ops, each fused conv costs about 20 us more of Python than the oneDNN call itself
(argument checks, autocast, the call's key, the validation and backend memos, the layout notes). Here
the blocks call what the oneDNN backend calls for them (backends/onednn.py, with the call the ops would
hand it), in the same order, so the result is the same to the bit. Measured side by side (2 threads,
AVX512-BF16, 224x224): ResNet-50 at batch 1 22.9 ms against 24.0 ms through the modules (-4.6% round by
round), at batch 8 -3.2%; ResNet-18 -3.0% and -2.3%.

It is taken only where it cannot differ from calling the modules:
- a call of the same input size, dtype and modules went through the ops before, which validated every
  layer, and oneDNN served every conv of it (backend "auto" or "onednn": a fallback, another backend
  or an error keeps the modules' path);
- no hook is registered (global, or on any module of the stages), nothing records autograd (no
  gradient mode), autocast is off, and nothing traces or transforms the call (ops.plain_eager_call);
- the stages still hold FusedBasicBlock / FusedBottleneck whose convs are plain FusedConv2d, none with a
  forward of its own, all as they were on that first call.
Packed weights come from the backend's cache on every call, so an edited weight is never served stale.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import dispatch, ops
from .backends import onednn
from .call import ConvCall

# Validated calls, per owner (a model or a stage): one called with inputs of ever-new sizes keeps this many.
MAX_KEYS_PER_MODEL = 4
_validated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {input key: _Stages.signature}


class _Stages:
    """The blocks of a model's stages as this module runs them: (main convs, downsample conv or None)
    each, and what the validation of a call depended on: the modules and parameters (by identity) and
    the convs' arguments and weight shapes (by value)."""

    def __init__(self):
        self.blocks: list[tuple[tuple, nn.Module | None]] = []
        self._modules: list = []
        self._values: list = []

    def add(self, block: nn.Module, convs: tuple, downsample: nn.Module | None) -> None:
        self.blocks.append((convs, downsample))
        self._modules.append(block)
        for conv in (*convs, downsample):
            if conv is not None:
                weight, bias = conv.weight, conv.bias
                self._modules += (conv, weight, bias)
                self._values.append((weight.shape, weight.dtype, None if bias is None else (bias.shape, bias.dtype),
                                     conv.stride, conv.padding, conv.dilation, conv.groups, conv.relu))

    @property
    def convs(self) -> int:
        return sum(len(convs) + (downsample is not None) for convs, downsample in self.blocks)

    def same_as(self, signature: tuple) -> bool:
        modules, values = signature
        return len(modules) == len(self._modules) and all(map(operator.is_, modules, self._modules)) and values == self._values

    @property
    def signature(self) -> tuple:
        return tuple(self._modules), self._values


def _stages(layers: tuple, block_types: tuple, conv_type: type, blocks_as_modules: bool) -> _Stages | None:
    """The blocks of `layers`, or None where one of them is not what this module runs (see the module
    docstring). `blocks_as_modules`: the modules' path calls each block as a module, which returns the
    layout its `output_layout` and notes say; so those must be a channels_last hand-on, as here."""
    stages = _Stages()
    for layer in layers:
        for block in layer._modules.values():
            if type(block) not in block_types or ops.has_hooks(block) or "forward" in block.__dict__:
                return None
            if blocks_as_modules and (block.output_layout != "channels_last" or block._x_note is not None):
                return None
            convs = tuple(block._modules.get(conv_name) for conv_name in block.CONVS)
            downsample = block._modules.get("downsample")
            for conv in (*convs, downsample):
                if conv is None:
                    continue
                if (type(conv) is not conv_type or conv.backend not in ("auto", onednn.NAME) or conv.output_layout != "channels_last"
                        or ops.has_hooks(conv) or "forward" in conv.__dict__ or conv._modules
                        or conv._x_note is not None or conv._residual_note is not None):
                    return None
            if None in convs or not all(conv.relu for conv in convs) or (downsample is not None and downsample.relu):
                return None
            if len(block._modules) != len(convs) + (downsample is not None):  # a module added to the block
                return None
            stages.add(block, convs, downsample)
    return stages


def _eligible_call(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not (_global_forward_hooks or _global_forward_pre_hooks)
        and ops.plain_eager_call(x)
    )


def run(owner: nn.Module, layers: tuple, x: Tensor, owned: bool, run_modules, block_types: tuple, conv_type: type,
        blocks_as_modules: bool = True) -> Tensor:
    """The blocks of `layers` (containers of blocks, which the caller checked) applied to `x`: straight
    oneDNN calls where they compute what `run_modules(x, owned)` (the modules' own path) computes, else
    that. `owned`: only the caller holds `x`, so the first block may write its result over it. The
    blocks must be of `block_types` and their convs exactly of `conv_type` (nn.py's, which imports this
    module); `blocks_as_modules` as in `_stages`. Validated calls are kept per `owner`."""
    stages = _stages(layers, block_types, conv_type, blocks_as_modules) if _eligible_call(x) else None
    if stages is None:
        return run_modules(x, owned)
    key = (x.shape, x.stride(), x.dtype)
    signature = _validated.get(owner, {}).get(key)
    if signature is not None and stages.same_as(signature):
        return _run_blocks(stages.blocks, x, owned)
    with dispatch.record_serving() as served:
        y = run_modules(x, owned)
    if served == [onednn.NAME] * stages.convs:
        keys = _validated.setdefault(owner, {})
        if len(keys) >= MAX_KEYS_PER_MODEL:
            keys.clear()
        keys[key] = stages.signature
    return y


def _conv(conv: nn.Module, x: Tensor, residual: Tensor | None = None, residual_writable: bool = False) -> Tensor:
    """What ops.conv2d_bias_act computes for this conv once it chose oneDNN, without its checks."""
    dilation = ops.effective_dilation(conv.weight, conv.dilation)
    call = ConvCall(x, conv.weight, conv.bias, residual, conv.stride, conv.padding, dilation, conv.groups, conv.relu)
    out = residual if residual_writable and dispatch.writable_residual(onednn, call, residual.shape) else None
    dispatch.note_serving(onednn)
    return onednn.conv2d_bias_act(out, call)


def _run_blocks(blocks: list, x: Tensor, owned: bool) -> Tensor:
    for convs, downsample in blocks:  # as _FusedResidualBlock.forward and FusedResNet's loop, hooks aside
        out = x
        for conv in convs[:-1]:
            out = _conv(conv, out)
        residual, writable = (x, owned) if downsample is None else (_conv(downsample, x), True)
        x = _conv(convs[-1], out, residual, writable)
        owned = True
    return x
