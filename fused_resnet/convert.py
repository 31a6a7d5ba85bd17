"""fr.fuse: a fused copy of a model built from torchvision ResNet blocks. The input model is never modified."""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends
from .nn import FusedResNet, fuse_block


def _is_plain_resnet(model: nn.Module) -> bool:
    """A torchvision ResNet whose forward is torchvision's own, so FusedResNet computes the same function."""
    cls = type(model)
    return isinstance(model, ResNet) and cls.forward is ResNet.forward and cls._forward_impl is ResNet._forward_impl


def _swap_blocks(module: nn.Module, backend: str, dtype, fused: dict[int, tuple] | None = None) -> int:
    """Replaces, in place, every BasicBlock/Bottleneck below `module` by its fused twin; returns how many.

    A block used at several places (the same object twice) gets one fused twin, shared the same way.
    """
    fused = {} if fused is None else fused
    count = 0
    for name, child in list(module._modules.items()):  # unlike named_children(), repeats shared modules
        if isinstance(child, (BasicBlock, Bottleneck)):
            if id(child) not in fused:  # holding the block keeps its id from being reused
                fused[id(child)] = (child, fuse_block(child, backend, dtype))
            setattr(module, name, fused[id(child)][1])
            count += 1
        elif child is not None:
            count += _swap_blocks(child, backend, dtype, fused)
    return count


def fuse(
    model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None, verify: bool | None = None
) -> nn.Module:
    """A new module computing `model`'s eval-mode function with fused conv + BN + ReLU (+ residual) ops.

    A torchvision ResNet becomes a FusedResNet (stem, blocks and shortcuts fused). Any other module tree
    is copied with each torchvision BasicBlock / Bottleneck replaced by its fused twin, the rest unchanged.
    `backend` ("auto", "torch", "triton", "cuda") is used by every fused conv; `dtype` casts the result.
    `verify` checks the backend's result for each layer, on its first call, against the reference
    backend (parity rule); a layer that fails runs on the reference, with a warning ("auto" on a GPU
    checks every candidate anyway). `verify=None` reads FUSED_RESNET_VERIFY (1: verify), here, once.
    The returned module is in eval mode; the input model is left untouched.
    """
    backends.check_name(backend)
    if verify is None:
        verify = os.environ.get("FUSED_RESNET_VERIFY", "0") == "1"
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool or None, got {verify!r}")
    if verify:
        backend = backends.verified(backend)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    if _is_plain_resnet(model):
        fused = FusedResNet.from_resnet(model, backend, dtype)
    else:
        if isinstance(model, (BasicBlock, Bottleneck)):
            fused = fuse_block(model, backend, dtype)
        else:
            fused = copy.deepcopy(model)
            if _swap_blocks(fused, backend, dtype) == 0:
                warnings.warn(
                    f"fused_resnet.fuse: {type(model).__name__} contains no torchvision BasicBlock or "
                    "Bottleneck; returning an unfused copy",
                    stacklevel=2,
                )
    fused.eval()
    return fused.to(dtype)  # the parts left unfused; the folded weights are already in dtype
