"""fr.inspect: what fr.fuse makes of a model, group by group, and why a group stays unfused.

    print(fr.inspect(model))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .convert import fuse_with_report
from .fold import BN_TYPES
from .graph_fuse import FusionGroup


aten = torch.ops.aten
# Every way eager PyTorch runs an eval-mode BatchNorm on the CPU, and torchvision FrozenBatchNorm2d's
# hand-written one (x * scale + bias, its scale from an rsqrt of running_var at every call; nothing
# else in a ResNet takes an rsqrt).
BATCH_NORM_OPS = {
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
    aten.native_batch_norm,
    aten.batch_norm,
    aten.rsqrt,
}


# ... and every other normalization (group, layer, instance norm).
NORM_OPS = BATCH_NORM_OPS | {aten.native_group_norm, aten.group_norm, aten.native_layer_norm, aten.layer_norm, aten.instance_norm}


class _CountOps(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in self.ops
        return func(*args, **(kwargs or {}))


def batch_norm_ops(model: nn.Module, *inputs, ops=BATCH_NORM_OPS) -> int:
    """How many batch-norm operators (or, with `ops=NORM_OPS`, normalization operators) run while `model`
    computes `model(*inputs)`."""
    with torch.no_grad(), _CountOps(ops) as counter:
        model(*inputs)
    return counter.count


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, BN_TYPES) for m in model.modules())


@dataclass
class FusionReport:
    model: str  # the model's class name
    batch_norms_before: int  # BatchNorm modules in the model
    batch_norms_after: int  # BatchNorm modules left in the fused model
    groups: list[FusionGroup]

    @property
    def unfused(self) -> list[FusionGroup]:
        return [group for group in self.groups if not group.fused]

    def __str__(self) -> str:
        width = max((len(group.name) for group in self.groups), default=0)
        lines = [
            f"{self.model}: {len(self.groups) - len(self.unfused)} groups fused, {len(self.unfused)} left unfused; "
            f"BatchNorm modules {self.batch_norms_before} -> {self.batch_norms_after}"
        ]
        for group in self.groups:
            verdict = "fused    " if group.fused else "NOT fused"
            why = f": {group.reason}" if group.reason else ""
            lines.append(f"  {verdict}  {group.name or '(the model)':{width}s}  {group.pattern}{why}")
        return "\n".join(lines)


def inspect(model: nn.Module) -> FusionReport:
    """What fr.fuse(model) fuses: one row per fused group, and per BatchNorm left as it is with the reason.
    The model is not modified."""
    fused, groups = fuse_with_report(model, backend="torch", warn=False)
    return FusionReport(type(model).__name__, _batch_norms(model), _batch_norms(fused), groups)
