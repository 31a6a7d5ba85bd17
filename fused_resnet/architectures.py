"""The torchvision models fused_resnet converts, by name, built with random weights (no download)."""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .parity import randomize_bn_

TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

# name -> (constructor, keyword arguments)
ARCHITECTURES = {name: (getattr(tvm, name), {}) for name in TORCHVISION_RESNETS}
ARCHITECTURES["resnet50_dilated"] = (tvm.resnet50, {"replace_stride_with_dilation": [False, True, True]})
ARCHITECTURES["resnet50_frozen_bn"] = (tvm.resnet50, {"norm_layer": FrozenBatchNorm2d})
# One architecture per kind of block and conv (basic, bottleneck, grouped, dilated, frozen BN): the
# others are deeper or wider copies of these, which the quick test sets leave to the `slow` marker.
REPRESENTATIVE = ("resnet18", "resnet50", "resnext50_32x4d", "resnet50_dilated", "resnet50_frozen_bn")


def build(name: str, generator: torch.Generator | None = None, randomize_bn: bool = True) -> nn.Module:
    """A randomly initialised model in eval mode, its BatchNorm statistics randomised unless told not to."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    constructor, kwargs = ARCHITECTURES[name]
    if generator is not None:
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    model = constructor(weights=None, **kwargs).eval()
    return randomize_bn_(model, generator) if randomize_bn else model
