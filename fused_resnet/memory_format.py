"""Conversions between NCHW and channels_last, and when a tensor is what it looks like.

An image in NCHW is a (C, H*W) matrix and in channels_last its transpose, so on the CPU a conversion is
one transposed copy per image. The CPU extension (csrc/cpu/layout_copy.cpp, fused_resnet._cpu) copies
them in 8x8 tiles in vector registers on all of ATen's threads. The four stage outputs of a ResNet-50 at
batch 2 (11.5 MiB, new memory as in a forward pass) take 0.68 ms, 1.04x a plain `clone` of the same
bytes and a fourth of ATen's `.contiguous()` (2 threads, AVX512-BF16); a large copy into NCHW (a
returned map) is stored past the caches (benchmarks/layout_copy.py). Without the extension
(FUSED_RESNET_SKIP_CPU_BUILD=1, or a source tree never built) the copies are ATen's, image by image.
Where autograd records the copy, on a GPU, or where a trace would record the loop, they are ATen's own
`.contiguous()`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from . import cpu_extension


def tracing() -> bool:
    """torch.fx, torch.export or torch.compile is tracing: what the code does is recorded, not run once."""
    return is_fx_symbolic_tracing() or torch.compiler.is_compiling()


def plain_run() -> bool:
    """Tensors are what they look like: no trace records the code, no torch.func transform or forward-mode
    AD wraps them (so their identity, version and memory can be relied on)."""
    return not (tracing() or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0)


def is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _by_matrices(t: Tensor) -> bool:
    return t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()) and plain_run()


def _native(t: Tensor):
    """The extension's ops where they can copy `t` (its elements are moved as 1, 2, 4 or 8 bytes), else None."""
    return cpu_extension.ops() if t.element_size() in (1, 2, 4, 8) and t.layout == torch.strided else None


def to_nchw(t: Tensor) -> Tensor:
    """`t` as a contiguous (NCHW) tensor."""
    if tracing():  # a trace records ATen's copy (and cannot branch on a traced tensor's strides)
        return t.contiguous()
    if not is_channels_last(t) or not _by_matrices(t):
        return t.contiguous()
    native = _native(t)
    if native is not None:
        return native.channels_last_to_contiguous(t)
    n, c, h, w = t.shape
    out = torch.empty((n, c, h, w), dtype=t.dtype)
    pixels = t.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of t's memory: (pixel, channel) per image
    for i in range(n):
        out[i].view(c, h * w).copy_(pixels[i].t())
    return out


def to_channels_last(t: Tensor) -> Tensor:
    """`t` as a channels_last tensor (`t` itself if it is one)."""
    if tracing():  # as in to_nchw
        return t.contiguous(memory_format=torch.channels_last)
    return t if is_channels_last(t) else channels_last_copy(t)


def channels_last_copy(t: Tensor) -> Tensor:
    """A new dense channels_last tensor (strides and all) holding `t`'s values."""
    if t.dim() != 4 or not t.is_contiguous() or not _by_matrices(t):
        return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    native = _native(t)
    if native is not None:
        return native.contiguous_to_channels_last(t)
    n, c, h, w = t.shape
    out = torch.empty((n, c, h, w), dtype=t.dtype, memory_format=torch.channels_last)
    pixels = out.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of out's memory
    for i in range(n):
        pixels[i].copy_(t[i].view(c, h * w).t())
    return out
