"""Checking a backend's result for one layer against the reference backend, under the parity rule.

A kernel that is wrong on the user's GPU (and none of them has run on one in this project's CI) must
not change the model's function silently. Before a backend is trusted with a layer, its output on the
layer's real inputs is compared with the reference backend's: computed in float64 for the reference,
and in the layer's own dtype for "eager PyTorch", whose error sets the bound (fused_resnet.parity).
The reference in the layer's dtype is exactly what eager PyTorch computes for that layer, so the
bound is eager's error on this very layer, not a tolerance guessed in advance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .backends import reference
from .parity import parity


def _disagreement(output: Tensor, compute: Callable[..., Tensor], *inputs: Tensor | None) -> str | None:
    """Why `output` fails the parity rule against `compute(*inputs)` (None when it passes)."""
    eager = compute(*inputs)
    exact = compute(*(None if t is None else t.to(torch.float64) for t in inputs))
    result = parity(output, eager, exact)
    return None if result.ok else f"disagrees with the reference: {result}"


def conv_disagreement(output, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> str | None:
    """Why `output`, one backend's conv2d_bias_act of these arguments, is wrong (None when it is right)."""

    def compute(x, weight, bias, residual):
        return reference.conv2d_bias_act(None, x, weight, bias, residual, stride, padding, dilation, groups, relu)

    return _disagreement(output, compute, x, weight, bias, residual)


def add_relu_disagreement(output, x, y) -> str | None:
    """Why `output`, one backend's add_relu(x, y), is wrong (None when it is right)."""

    def compute(x, y):
        out = torch.empty_like(x)
        reference.add_relu(out, x, y)
        return out

    return _disagreement(output, compute, x, y)
