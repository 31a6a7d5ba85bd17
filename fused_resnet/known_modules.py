"""Which modules the fuser knows the function of, and why it refuses the others.

A module is only folded or replaced when its class computes exactly what the fused code will:
a subclass that overrides `forward` computes something else (squeeze-excitation added to a
Bottleneck, weight standardisation in a conv), so it is never taken for its base class. Each
check returns None when the module is known, otherwise the reason, worded for the fusion report.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from .fold import FrozenBatchNormAct2d

try:  # timm's BatchNorm + activation in one module; timm is optional
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover - depends on the environment
    BatchNormAct2d = None

# The BatchNorm classes whose forward is the affine map of their running statistics in eval mode.
_BN_FORWARDS = {nn.BatchNorm2d: nn.BatchNorm2d.forward, nn.SyncBatchNorm: nn.SyncBatchNorm.forward, FrozenBatchNorm2d: FrozenBatchNorm2d.forward}
_ACT_BNS = tuple(cls for cls in (BatchNormAct2d, FrozenBatchNormAct2d) if cls is not None)  # BN, then an activation
for _cls in _ACT_BNS:
    _BN_FORWARDS[_cls] = _cls.forward


def _own_forward(module: nn.Module, base: type) -> bool:
    """`module` is a `base` that runs `base`'s forward: not a subclass's, not one assigned to the instance."""
    return isinstance(module, base) and type(module).forward is base.forward and "forward" not in module.__dict__


def hook_problem(module: nn.Module) -> str | None:
    """Why rewriting `module` could change what the model does or shows: a hook or a parametrization on it
    (old-style weight_norm and spectral_norm are forward pre-hooks). None when it has neither."""
    kinds = [
        kind
        for kind, hooks in (
            ("forward pre-hook", module._forward_pre_hooks),
            ("forward hook", module._forward_hooks),
            ("backward hook", module._backward_hooks),
            ("backward pre-hook", module._backward_pre_hooks),
            ("state_dict hook", module._state_dict_hooks),
            ("load_state_dict pre-hook", module._load_state_dict_pre_hooks),
        )
        if hooks
    ]
    if parametrize.is_parametrized(module):
        kinds.append("parametrization")
    if not kinds:
        return None
    return f"it has a {' and a '.join(dict.fromkeys(kinds))}, which the fused model could not call as the model does"


def conv_problem(conv: nn.Module) -> str | None:
    """None for an nn.Conv2d that computes F.conv2d with numeric zero padding, with no hook on it."""
    if not _own_forward(conv, nn.Conv2d):
        return f"{type(conv).__name__} has its own forward"
    hooked = hook_problem(conv)
    if hooked is not None:
        return hooked
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding folds)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only numeric padding is supported)"
    return None


def bn_problem(bn: nn.Module) -> str | None:
    """None for a 2-d BatchNorm (or timm BatchNormAct2d) that applies its running statistics."""
    if not any(isinstance(bn, cls) and type(bn).forward is forward for cls, forward in _BN_FORWARDS.items()):
        return f"{type(bn).__name__} is not a BatchNorm2d the fuser knows"
    if "forward" in bn.__dict__:
        return f"{type(bn).__name__} has a forward of its own (assigned to the instance)"
    hooked = hook_problem(bn)
    if hooked is not None:
        return hooked
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalises with each batch's statistics"
    if is_training_batch_norm(bn):
        return "in training mode (batch statistics)"
    if isinstance(bn, _ACT_BNS) and type(bn.drop) is not nn.Identity:
        return f"its drop layer {type(bn.drop).__name__} is not the identity"
    return None


def is_training_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm that normalises with batch statistics now (frozen ones never do, whatever their mode)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU and "forward" not in module.__dict__ and hook_problem(module) is None


# Activations that act on each element alone, so that they give the same values in either memory format.
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Sigmoid,
    nn.Tanh, nn.Mish, nn.Hardtanh, nn.Softplus,
)


def is_elementwise_activation(module: nn.Module) -> bool:
    """One of ELEMENTWISE_ACTIVATIONS itself (not a subclass), with its own forward and no hook."""
    return type(module) in ELEMENTWISE_ACTIVATIONS and "forward" not in module.__dict__ and hook_problem(module) is None


def is_max_pool(module: nn.Module) -> bool:
    """A plain nn.MaxPool2d (no indices returned, its own forward, no hook): it pools channels_last
    as it pools NCHW, to the same values."""
    return (
        type(module) is nn.MaxPool2d and not module.return_indices and "forward" not in module.__dict__
        and hook_problem(module) is None
    )


def bn_activation(bn: nn.Module) -> nn.Module | None:
    """The activation a BatchNormAct2d applies after normalising (None for a plain BatchNorm or the identity)."""
    act = getattr(bn, "act", None) if isinstance(bn, _ACT_BNS) else None
    return None if act is None or type(act) is nn.Identity else act


def block_twin_problem(block: nn.Module) -> str | None:
    """None when FusedBasicBlock / FusedBottleneck computes exactly what `block` computes: torchvision's
    forward, unmodified, over a plain conv, BatchNorm and ReLU at each place."""
    base = BasicBlock if isinstance(block, BasicBlock) else Bottleneck if isinstance(block, Bottleneck) else None
    if base is None:
        return f"{type(block).__name__} is not a torchvision BasicBlock or Bottleneck"
    if not _own_forward(block, base):
        return f"{type(block).__name__} overrides {base.__name__}.forward"
    for name, module in block.named_modules():
        hooked = hook_problem(module)
        if hooked is not None:
            return f"{name or 'the block'}: {hooked}"
    count = 2 if base is BasicBlock else 3
    for i in range(1, count + 1):
        for name, check in ((f"conv{i}", conv_problem), (f"bn{i}", bn_problem)):
            problem = check(getattr(block, name))
            if problem is not None or (name.startswith("bn") and bn_activation(getattr(block, name)) is not None):
                return f"{name}: {problem or 'applies an activation of its own'}"
    if not is_relu(block.relu):
        return f"relu is a {type(block.relu).__name__}, not nn.ReLU"
    return None


def foldable_shortcut(downsample: nn.Module | None) -> tuple[nn.Conv2d, nn.Module] | None:
    """(conv, BatchNorm) when `downsample` is torchvision's shortcut, nn.Sequential(conv, BN) computing
    bn(conv(x)) with their own forwards and no hooks; None for any other module (kept as it is)."""
    if type(downsample) is not nn.Sequential or "forward" in downsample.__dict__ or hook_problem(downsample):
        return None
    parts = list(downsample.children())
    if len(parts) != 2 or conv_problem(parts[0]) is not None or bn_problem(parts[1]) is not None:
        return None
    return None if bn_activation(parts[1]) is not None else (parts[0], parts[1])
