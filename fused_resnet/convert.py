"""fr.fuse: a fused copy of a model. The input model is never modified.

A torchvision ResNet whose forward and modules are torchvision's own becomes a FusedResNet; any other
model is copied, its unmodified torchvision blocks are swapped for their fused twins, and the graph pass
(graph_fuse.py) folds every other conv -> BN (-> add) (-> ReLU) chain it can prove equal.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends, cpu_isa
from .graph_fuse import FusionGroup, fuse_graph, scan
from .layout_plan import plan_layouts
from .known_modules import (
    bn_activation, bn_problem, block_twin_problem, conv_problem, hook_problem, is_relu, is_training_batch_norm,
)
from .safety import Refusals
from .nn import RESIDUAL_BLOCKS, FusedResNet, FusedStage, fuse_block


def _is_plain_resnet(model: nn.Module) -> bool:
    """A torchvision ResNet whose forward, stem, stages, blocks and head are torchvision's own, with no hook,
    parametrization or tied parameter anywhere: then FusedResNet computes the same function and nothing
    the model lets a user observe is lost."""
    cls = type(model)
    if not (
        isinstance(model, ResNet)
        and cls.forward is ResNet.forward
        and cls._forward_impl is ResNet._forward_impl
        and not {"forward", "_forward_impl"} & set(model.__dict__)
    ):
        return False
    layers = [getattr(model, f"layer{i}") for i in range(1, 5)]
    if not all(type(layer) is nn.Sequential and "forward" not in layer.__dict__ for layer in layers):
        return False
    if any(hook_problem(m) is not None for m in model.modules()) or Refusals(model).reasons:
        return False
    plain = {"maxpool": nn.MaxPool2d, "avgpool": nn.AdaptiveAvgPool2d, "fc": nn.Linear}
    return (
        all(type(getattr(model, name)) is kind and "forward" not in getattr(model, name).__dict__ for name, kind in plain.items())
        and conv_problem(model.conv1) is None
        and bn_problem(model.bn1) is None
        and bn_activation(model.bn1) is None
        and is_relu(model.relu)
        and all(block_twin_problem(block) is None for layer in layers for block in layer)
    )


def _swap_blocks(module: nn.Module, backend: str, dtype, groups: list, refusals: Refusals, prefix: str = "", fused: dict | None = None) -> None:
    """Replaces, in place, every torchvision BasicBlock/Bottleneck below `module` that its fused twin computes
    exactly (see known_modules.block_twin_problem) and that holds no module that must stay as it is; the
    others are left to the graph pass. A module with hooks is never replaced: its children may be.

    A block used at several places (the same object twice) gets one fused twin, shared the same way.
    """
    fused = {} if fused is None else fused
    for name, child in list(module._modules.items()):  # unlike named_children(), repeats shared modules
        if isinstance(child, (BasicBlock, Bottleneck)) and block_twin_problem(child) is None and not refusals.any_refused(child):
            if id(child) not in fused:  # holding the block keeps its id from being reused
                fused[id(child)] = (child, fuse_block(child, backend, dtype, output_layout="as_eager"))
            setattr(module, name, fused[id(child)][1])
            groups.append(FusionGroup(prefix + name, f"torchvision {type(child).__name__} -> {type(fused[id(child)][1]).__name__}", True))
        elif child is not None:
            _swap_blocks(child, backend, dtype, groups, refusals, f"{prefix}{name}.", fused)


def _stages_as_fused(model: nn.Module) -> None:
    """Makes every plain nn.Sequential of fused residual blocks below `model` (a copy fr.fuse owns) a
    FusedStage, whose blocks hand each other channels_last where nothing could tell."""
    for module in model.modules():
        blocks = list(module._modules.values())
        if type(module) is nn.Sequential and "forward" not in module.__dict__ and blocks and all(type(b) in RESIDUAL_BLOCKS for b in blocks):
            module.__class__ = FusedStage


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model`, or an error that says what stops it and what to do."""
    # Hooks are the user's: the copy calls the very same callables (a bound method's object is not copied).
    memo = {
        id(hook): hook
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks, module._backward_pre_hooks,
                      module._state_dict_hooks, module._load_state_dict_pre_hooks)
        for hook in hooks.values()
    }
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        for name, module in model.named_modules():
            if any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values()):
                raise ValueError(
                    f"{name or 'the model'} uses the old-style torch.nn.utils.weight_norm, which cannot be copied "
                    f"({type(error).__name__}: {error}). Remove it first with torch.nn.utils.remove_weight_norm "
                    f"(it keeps the current weight), or use torch.nn.utils.parametrizations.weight_norm, which fr.fuse "
                    "copies and leaves unfused, saying why"
                ) from error
        raise TypeError(
            f"fr.fuse works on a copy of the model, and copy.deepcopy({type(model).__name__}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def _check_eval_mode(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if is_training_batch_norm(m)]
    if training:
        raise ValueError(
            f"{len(training)} BatchNorm modules ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}) are in "
            "training mode, where they normalise with batch statistics; call model.eval() before fusing"
        )


def fuse_with_report(
    model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None, warn: bool = True
) -> tuple[nn.Module, list[FusionGroup]]:
    """fr.fuse, and one FusionGroup per fused group and per normalization layer left unfused (with the
    reason); with `warn`, one warning when any is left."""
    backends.check_name(backend)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    _check_eval_mode(model)
    groups: list[FusionGroup] = []
    if _is_plain_resnet(model):
        fused = FusedResNet.from_resnet(model, backend, dtype)
        groups.append(FusionGroup("", "torchvision ResNet -> FusedResNet", True))
    elif isinstance(model, (BasicBlock, Bottleneck)) and block_twin_problem(model) is None and not Refusals(model).reasons:
        fused = fuse_block(model, backend, dtype, output_layout="as_eager")
        groups.append(FusionGroup("", f"torchvision {type(model).__name__} -> {type(fused).__name__}", True))
    else:
        fused = _copy(model).eval()
        refusals = Refusals(fused)
        scan(fused, refusals)
        _swap_blocks(fused, backend, dtype, groups, refusals)
        fused = fuse_graph(fused, backend, dtype, groups, refusals, replaceable=hook_problem(fused) is None)
        _stages_as_fused(fused)
        plan_layouts(fused)
    _report_remaining_norms(fused, groups)
    if warn:
        _warn_left(model, groups)
    fused.eval()
    return fused.to(dtype), groups  # the parts left unfused; the folded weights are already in dtype


_NORM_NAME = re.compile(r"(Batch|Group|Layer|Instance|Rms|RMS|LocalResponse)Norm")


def _is_norm(module: nn.Module) -> bool:
    return bool(_NORM_NAME.search(type(module).__name__)) and not type(module).__module__.startswith("fused_resnet")


def _norm_reason(module: nn.Module) -> str:
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)) or (
        "BatchNorm" not in type(module).__name__
    ):
        return f"{type(module).__name__} normalises each input with that input's own statistics: no fixed map to fold"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return f"{type(module).__name__}: only a 2-d BatchNorm after a Conv2d folds"
    return "left as it is"


def _report_remaining_norms(fused: nn.Module, groups: list[FusionGroup]) -> None:
    """Adds a group for every normalization layer that still runs in `fused` and has none yet."""
    reported = {group.name for group in groups if not group.fused}
    for name, module in fused.named_modules():
        if _is_norm(module) and name not in reported:
            groups.append(FusionGroup(name, type(module).__name__, False, _norm_reason(module)))


def _warn_left(model: nn.Module, groups: list[FusionGroup]) -> None:
    left = [group for group in groups if not group.fused]
    if not any(group.fused for group in groups):
        warnings.warn(
            f"fused_resnet.fuse: nothing in {type(model).__name__} could be fused (no conv followed by BatchNorm "
            "or ReLU that is safe to rewrite; a conv followed by a residual add alone runs faster as it is); "
            "returning an unfused copy. fr.inspect(model) says why",
            stacklevel=4,
        )
    elif left:
        warnings.warn(
            f"fused_resnet.fuse: {len(left)} normalization layer{'s' if len(left) > 1 else ''} of "
            f"{type(model).__name__} still run as they are; fr.inspect(model) says why for each",
            stacklevel=4,
        )


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
    `backend` ("auto" or one of fused_resnet.backends.NAMES) is used by every fused conv; `dtype` casts the result.
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
