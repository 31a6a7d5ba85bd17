"""fr.fuse: a fused copy of a model. The input model is never modified.

A torchvision ResNet whose forward and modules are torchvision's own becomes a FusedResNet; any other
model is copied, its unmodified torchvision blocks are swapped for their fused twins, and the graph pass
(graph_fuse.py) folds every other conv -> BN (-> add) (-> ReLU) chain it can prove equal.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends, cpu_isa
from .fold import BN_TYPES
from .graph_fuse import FusionGroup, fuse_graph
from .known_modules import bn_problem, block_twin_problem, conv_problem, is_relu
from .nn import FusedResNet, fuse_block


def _is_plain_resnet(model: nn.Module) -> bool:
    """A torchvision ResNet whose forward, stem and blocks are torchvision's own, so FusedResNet computes the same function."""
    cls = type(model)
    return (
        isinstance(model, ResNet)
        and cls.forward is ResNet.forward
        and cls._forward_impl is ResNet._forward_impl
        and conv_problem(model.conv1) is None
        and bn_problem(model.bn1) is None
        and is_relu(model.relu)
        and all(block_twin_problem(block) is None for i in range(1, 5) for block in getattr(model, f"layer{i}"))
    )


def _swap_blocks(module: nn.Module, backend: str, dtype, groups: list, prefix: str = "", fused: dict | None = None) -> None:
    """Replaces, in place, every torchvision BasicBlock/Bottleneck below `module` that its fused twin computes
    exactly (see known_modules.block_twin_problem); the others are left to the graph pass.

    A block used at several places (the same object twice) gets one fused twin, shared the same way.
    """
    fused = {} if fused is None else fused
    for name, child in list(module._modules.items()):  # unlike named_children(), repeats shared modules
        if isinstance(child, (BasicBlock, Bottleneck)) and block_twin_problem(child) is None:
            if id(child) not in fused:  # holding the block keeps its id from being reused
                fused[id(child)] = (child, fuse_block(child, backend, dtype))
            setattr(module, name, fused[id(child)][1])
            groups.append(FusionGroup(prefix + name, f"torchvision {type(child).__name__} -> {type(fused[id(child)][1]).__name__}", True))
        elif child is not None:
            _swap_blocks(child, backend, dtype, groups, f"{prefix}{name}.", fused)


def _check_eval_mode(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, BN_TYPES) and m.training]
    if training:
        raise ValueError(
            f"{len(training)} BatchNorm modules ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}) are in "
            "training mode, where they normalise with batch statistics; call model.eval() before fusing"
        )


def fuse_with_report(model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None) -> tuple[nn.Module, list[FusionGroup]]:
    """fr.fuse, and one FusionGroup per fused group and per BatchNorm left unfused (with the reason)."""
    backends.check_name(backend)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    _check_eval_mode(model)
    groups: list[FusionGroup] = []
    if _is_plain_resnet(model):
        fused = FusedResNet.from_resnet(model, backend, dtype)
        groups.append(FusionGroup("", "torchvision ResNet -> FusedResNet", True))
    elif isinstance(model, (BasicBlock, Bottleneck)) and block_twin_problem(model) is None:
        fused = fuse_block(model, backend, dtype)
        groups.append(FusionGroup("", f"torchvision {type(model).__name__} -> {type(fused).__name__}", True))
    else:
        fused = copy.deepcopy(model).eval()
        _swap_blocks(fused, backend, dtype, groups)
        fused = fuse_graph(fused, backend, dtype, groups)
        if not any(group.fused for group in groups):
            warnings.warn(
                f"fused_resnet.fuse: nothing in {type(model).__name__} could be fused (no conv followed by "
                "BatchNorm, residual add or ReLU); returning an unfused copy. fr.inspect(model) says why",
                stacklevel=3,
            )
    fused.eval()
    return fused.to(dtype), groups  # the parts left unfused; the folded weights are already in dtype


def _warn_if_slower_than_float32(model: nn.Module, dtype: torch.dtype | None) -> None:
    """One warning when the fused model will compute in a dtype this CPU runs slower than float32. Not
    where a GPU is present: a model fused on the CPU there is usually moved to the GPU next."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or torch.cuda.is_available():
        return
    dtype = dtype or parameter.dtype
    reason = cpu_isa.slower_than_float32_reason(dtype)
    if reason is not None:
        warnings.warn(
            f"fused_resnet.fuse: {str(dtype).removeprefix('torch.')} computes slower than float32 on this CPU, "
            f"so float32 is faster here: {reason}",
            stacklevel=3,
        )


def fuse(
    model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None, verify: bool | None = None
) -> nn.Module:
    """A new module computing `model`'s eval-mode function with fused conv + BN + ReLU (+ residual) ops.

    A torchvision ResNet becomes a FusedResNet (stem, blocks and shortcuts fused). Any other module tree
    is copied with each unmodified torchvision BasicBlock / Bottleneck replaced by its fused twin and every
    other conv -> BN (-> add) (-> ReLU) chain folded into one fused conv where that provably computes the
    same function; the rest is unchanged (fr.inspect reports what was fused and why not).
    `backend` ("auto", "torch", "triton", "cuda") is used by every fused conv; `dtype` casts the result.
    `verify` checks the backend's result for each layer, on its first call, against the reference
    backend (parity rule); a layer that fails runs on the reference, with a warning ("auto" on a GPU
    checks every candidate anyway). `verify=None` reads FUSED_RESNET_VERIFY (1: verify), here, once.
    The returned module is in eval mode; the input model is left untouched.
    """
    if verify is None:
        verify = os.environ.get("FUSED_RESNET_VERIFY", "0") == "1"
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool or None, got {verify!r}")
    _warn_if_slower_than_float32(model, dtype)
    return fuse_with_report(model, backends.verified(backend) if verify else backend, dtype)[0]
