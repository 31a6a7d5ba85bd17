"""Which modules the fuser knows the function of, and why it refuses the others.

A module is only folded or replaced when its class computes exactly what the fused code will:
a subclass that overrides `forward` computes something else (squeeze-excitation added to a
Bottleneck, weight standardisation in a conv), so it is never taken for its base class. Each
check returns None when the module is known, otherwise the reason, worded for the fusion report.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

try:  # timm's BatchNorm + activation in one module; timm is optional
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover - depends on the environment
    BatchNormAct2d = None

# The BatchNorm classes whose forward is the affine map of their running statistics in eval mode.
_BN_FORWARDS = {nn.BatchNorm2d: nn.BatchNorm2d.forward, nn.SyncBatchNorm: nn.SyncBatchNorm.forward, FrozenBatchNorm2d: FrozenBatchNorm2d.forward}
if BatchNormAct2d is not None:
    _BN_FORWARDS[BatchNormAct2d] = BatchNormAct2d.forward


def _own_forward(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def conv_problem(conv: nn.Module) -> str | None:
    """None for an nn.Conv2d that computes F.conv2d with numeric zero padding."""
    if not _own_forward(conv, nn.Conv2d):
        return f"{type(conv).__name__} has its own forward"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding folds)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only numeric padding is supported)"
    return None


def bn_problem(bn: nn.Module) -> str | None:
    """None for a 2-d BatchNorm (or timm BatchNormAct2d) that applies its running statistics."""
    if not any(isinstance(bn, cls) and type(bn).forward is forward for cls, forward in _BN_FORWARDS.items()):
        return f"{type(bn).__name__} is not a BatchNorm2d the fuser knows"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalises with each batch's statistics"
    if bn.training:
        return "in training mode (batch statistics)"
    if BatchNormAct2d is not None and isinstance(bn, BatchNormAct2d) and type(bn.drop) is not nn.Identity:
        return f"its drop layer {type(bn.drop).__name__} is not the identity"
    return None


def is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU


def bn_activation(bn: nn.Module) -> nn.Module | None:
    """The activation a BatchNormAct2d applies after normalising (None for a plain BatchNorm or the identity)."""
    act = getattr(bn, "act", None) if BatchNormAct2d is not None and isinstance(bn, BatchNormAct2d) else None
    return None if act is None or type(act) is nn.Identity else act


def block_twin_problem(block: nn.Module) -> str | None:
    """None when FusedBasicBlock / FusedBottleneck computes exactly what `block` computes: torchvision's
    forward, unmodified, over a plain conv, BatchNorm and ReLU at each place."""
    base = BasicBlock if isinstance(block, BasicBlock) else Bottleneck if isinstance(block, Bottleneck) else None
    if base is None:
        return f"{type(block).__name__} is not a torchvision BasicBlock or Bottleneck"
    if type(block).forward is not base.forward:
        return f"{type(block).__name__} overrides {base.__name__}.forward"
    count = 2 if base is BasicBlock else 3
    for i in range(1, count + 1):
        for name, check in ((f"conv{i}", conv_problem), (f"bn{i}", bn_problem)):
            problem = check(getattr(block, name))
            if problem is not None or (name.startswith("bn") and bn_activation(getattr(block, name)) is not None):
                return f"{name}: {problem or 'applies an activation of its own'}"
    if not is_relu(block.relu):
        return f"relu is a {type(block.relu).__name__}, not nn.ReLU"
    return None
