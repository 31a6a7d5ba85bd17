"""fused_resnet: fused conv + BatchNorm + ReLU (+ residual add) kernels for ResNet inference.

    import fused_resnet as fr
    fused = fr.fuse(torchvision.models.resnet50().eval())
"""

from . import ops
from .convert import fuse
from .cuda_graph import CUDAGraphModule
from .export import export_onnx
from .fold import fold_bn
from .fusion_report import inspect
from .nn import FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedConv2dAct, FusedConv2dMaxPool, FusedConv2dPreact, FusedResNet, FusedStage, refresh
from .version import __version__

__all__ = ["__version__", "fuse", "CUDAGraphModule", "export_onnx", "fold_bn", "inspect", "ops", "refresh", "FusedConv2d", "FusedConv2dAct", "FusedConv2dMaxPool", "FusedConv2dPreact", "FusedBasicBlock", "FusedBottleneck", "FusedResNet", "FusedStage"]
