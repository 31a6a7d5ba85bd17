"""The models fused_resnet converts, by name, built with random weights (no download).

Names are torchvision's ResNets (ARCHITECTURES), other torchvision models with conv + BN that the graph
pass fuses (OTHER_MODELS), or `timm:<name>` for any timm model (timm is optional).
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
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
# name -> constructor taking num_classes (ignored by the backbones, which have no classifier)
OTHER_MODELS = {
    "fasterrcnn_fpn_backbone": lambda num_classes: resnet_fpn_backbone(backbone_name="resnet50", weights=None),
    "fasterrcnn_fpn_backbone_batchnorm": lambda num_classes: resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=nn.BatchNorm2d
    ),
    "deeplabv3_resnet50": lambda num_classes: tvm.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=num_classes
    ),
    "mobilenet_v2": lambda num_classes: tvm.mobilenet_v2(weights=None, num_classes=num_classes),
    "vgg11_bn": lambda num_classes: tvm.vgg11_bn(weights=None, num_classes=num_classes),
}
TIMM_PREFIX = "timm:"


def check_name(name: str) -> str:
    """`name` if it names a model this module can build; otherwise a ValueError saying what can be built."""
    if name in ARCHITECTURES or name in OTHER_MODELS:
        return name
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise ValueError(f"{name!r} needs timm, which is not installed: pip install timm") from None
        if timm.is_model(name.removeprefix(TIMM_PREFIX)):
            return name
        raise ValueError(f"timm has no model {name.removeprefix(TIMM_PREFIX)!r} (see timm.list_models())")
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join([*ARCHITECTURES, *OTHER_MODELS])}, or timm:<name> for a timm model")


def classifier_weight_key(name: str) -> str:
    """The state_dict key of the classifier's weight, whose first dimension is the number of classes."""
    if check_name(name).startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg_value

        return get_pretrained_cfg_value(name.removeprefix(TIMM_PREFIX), "classifier") + ".weight"
    return "fc.weight"


def create(name: str, num_classes: int = 1000) -> nn.Module:
    """The model `name` with random weights, in eval mode."""
    if check_name(name).startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=num_classes).eval()
    if name in OTHER_MODELS:
        return OTHER_MODELS[name](num_classes).eval()
    constructor, kwargs = ARCHITECTURES[name]
    return constructor(weights=None, num_classes=num_classes, **kwargs).eval()


def build(name: str, generator: torch.Generator | None = None, randomize_bn: bool = True) -> nn.Module:
    """A randomly initialised model in eval mode, its BatchNorm statistics randomised unless told not to."""
    check_name(name)
    if generator is not None:
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    model = create(name)
    return randomize_bn_(model, generator) if randomize_bn else model
