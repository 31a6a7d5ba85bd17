"""Checking a backend's result for one layer against the reference backend, under the parity rule.

A kernel that is wrong on the user's GPU (CI has no GPU: the kernels are compiled and inspected
there, never run) must not change the model's function silently. Before a backend is trusted with a
layer, its output on the layer's real inputs is compared with the reference backend's: computed in
float64 for the reference, and in the layer's own dtype for "eager PyTorch", whose error sets the
bound (fused_resnet.parity). The reference in the layer's dtype is exactly what eager PyTorch
computes for that layer, so the bound is eager's error on this very layer, not a tolerance guessed
in advance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .backends import reference
from .call import AddReluCall, ConvCall
from .parity import parity


def _checker(compute: Callable[[object], Tensor | tuple[Tensor, ...]], call, names: tuple[str, ...] | None = None) -> Callable:
    """A function saying why an output standing for `compute(call)` is wrong (None when it passes).

    With `names`, `compute` returns one tensor per name, and the function takes them as a tuple: each
    is held to the rule on its own scale (max|ref| of that output), and the first that fails is named.
    Both references are computed on its first call and kept for the next (one per candidate backend).
    """

    @functools.cache
    def references() -> tuple:
        return compute(call), compute(call.in_dtype(torch.float64))

    def disagreement(output) -> str | None:
        eager, exact = references()
        if names is None:
            output, eager, exact = (output,), (eager,), (exact,)
        for name, ours, theirs, ref in zip(names or ("",), output, eager, exact, strict=True):
            result = parity(ours, theirs, ref)
            if not result.ok:
                return f"{name + ' ' if name else ''}disagrees with the reference: {result}"
        return None

    return disagreement


def conv_checker(call: ConvCall) -> Callable[[Tensor], str | None]:
    """The check of a conv2d_bias_act output for this call."""
    return _checker(lambda c: reference.conv2d_bias_act(None, c), call)


def add_relu_checker(call: AddReluCall) -> Callable[[Tensor], str | None]:
    """The check of an add_relu(x, y) output."""

    def compute(c: AddReluCall) -> Tensor:
        out = torch.empty_like(c.x)
        reference.add_relu(out, c.x, c.y)
        return out

    return _checker(compute, call)


def preact_checker(call: ConvCall) -> Callable[[tuple[Tensor, Tensor]], str | None]:
    """The check of conv2d_preact's outputs, given as the pair (y, z).

    Each output is checked on its own scale: y (the block's sum) is often 10-30x larger than z (after
    the next BatchNorm), so an error measured against max|y| would let a z wrong everywhere pass.
    """
    return _checker(lambda c: reference.conv2d_preact(None, None, c), call, names=("y", "z"))
