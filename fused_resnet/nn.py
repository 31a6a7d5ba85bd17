"""Drop-in modules: a conv with its BatchNorm folded in, and the ResNet blocks built from it.

Every module here computes the eval-mode function of the modules it replaces. BatchNorm is folded
into fixed weights, so `.train()` cannot bring back batch statistics: a fused model in training
mode computes exactly what it computes in eval mode (like a network with frozen BatchNorm), and
its folded weights and biases stay trainable. `.train()` warns once to say so.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends, ops
from .fold import BN_TYPES, bn_scale_shift, fold_bn
from .known_modules import block_twin_problem
from .validation import conv_output_size

_TRAIN_MESSAGE = (
    "fused_resnet modules have their BatchNorm folded into the conv weights: in training mode they "
    "still use the folded running statistics (frozen BatchNorm), never batch statistics"
)
_warned_train = False


class FusedConv2d(nn.Module):
    """act(conv2d(x, weight) + bias [+ residual]); act is ReLU when `relu`, else the identity."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        relu: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        backends.check_name(backend)
        r, s = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (r, s)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.relu = relu
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        # channels_last weights are the (Cout, R, S, Cin/groups) GEMM operand the kernels read, as a free view.
        weight = torch.empty(out_channels, in_channels // groups, r, s, **factory)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None

    @classmethod
    def from_conv_bn(
        cls, conv: nn.Conv2d, bn: nn.Module | None = None, *, relu: bool, backend: str = "auto", dtype=None
    ):
        """The conv, with `bn` (if any) folded in, followed by ReLU if `relu`. Neither module is modified.

        `dtype` (default: the conv's) is the dtype of the folded weights, rounded once from float64."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(
                f"only numeric zero padding is supported, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        weight, bias = fold_bn(conv, bn, dtype=dtype)
        fused = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            relu=relu,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
        return fused

    def output_shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape of this conv's output for a 4-D input `x`."""
        sizes = map(conv_output_size, x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        return (x.shape[0], self.out_channels, *sizes)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, *, relu: bool | None = None, residual_writable: bool = False
    ) -> Tensor:
        """`relu=False` leaves out the activation (for a residual the epilogue cannot take).
        `residual_writable=True`: the caller will not read `residual` again (see ops.conv2d_bias_act)."""
        relu = self.relu if relu is None else relu
        return ops.conv2d_bias_act(
            x, self.weight, self.bias, residual, relu=relu, residual_writable=residual_writable, **self._conv_arguments()
        )

    def _conv_arguments(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups, backend=self.backend)

    def train(self, mode: bool = True):
        global _warned_train
        if mode and not _warned_train:
            _warned_train = True
            warnings.warn(_TRAIN_MESSAGE, stacklevel=2)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, relu={self.relu}, backend={self.backend!r}"
        )


class FusedConv2dPreact(FusedConv2d):
    """(y, z): y = conv2d(x, weight) + bias [+ residual], the residual stream of a pre-activation ResNet, and
    z = relu(y * preact_scale + preact_shift), the next block's BatchNorm + ReLU of it, from one kernel."""

    def __init__(self, *args, relu: bool = False, **kwargs):
        if relu:
            raise ValueError("FusedConv2dPreact's y is the residual stream, which is never activated: relu must be False")
        super().__init__(*args, relu=False, **kwargs)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.preact_scale = nn.Parameter(torch.empty(self.out_channels, **factory))
        self.preact_shift = nn.Parameter(torch.empty(self.out_channels, **factory))

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module | None = None, *, preact_bn: nn.Module, backend: str = "auto",
                     dtype=None):
        """The conv with `bn` (if any) folded in, and `preact_bn` (the BatchNorm that the ReLU of z follows)
        as its per-channel scale and shift. No module is modified."""
        fused = super().from_conv_bn(conv, bn, relu=False, backend=backend, dtype=dtype)
        scale, shift = bn_scale_shift(preact_bn, dtype=fused.weight.dtype)
        with torch.no_grad():
            fused.preact_scale.copy_(scale)
            fused.preact_shift.copy_(shift)
        return fused

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scale, shift = self.preact_scale, self.preact_shift
        return ops.conv2d_preact(x, self.weight, self.bias, residual, scale=scale, shift=shift, **self._conv_arguments())

    def conv(self, x: Tensor) -> Tensor:
        """conv2d(x, weight) + bias alone, for a residual the epilogue cannot take (then see pre_activate)."""
        return super().forward(x, relu=False)

    def pre_activate(self, y: Tensor) -> Tensor:
        """z for a y computed apart."""
        return torch.relu(y * self.preact_scale[:, None, None] + self.preact_shift[:, None, None])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", preact=True"


def fuse_downsample(downsample: nn.Module | None, backend: str, dtype=None) -> nn.Module | None:
    """A block's shortcut: torchvision's Sequential(conv 1x1, BN) becomes one FusedConv2d without ReLU.

    Any other shortcut is kept as it is (a copy), so the block still computes the same function.
    """
    if downsample is None:
        return None
    parts = list(downsample.children()) if isinstance(downsample, nn.Sequential) else []
    if len(parts) == 2 and isinstance(parts[0], nn.Conv2d) and isinstance(parts[1], BN_TYPES):
        return FusedConv2d.from_conv_bn(parts[0], parts[1], relu=False, backend=backend, dtype=dtype)
    warnings.warn(
        f"fused_resnet: shortcut {type(downsample).__name__} is not a (conv, BatchNorm) pair; kept unfused",
        stacklevel=3,
    )
    return copy.deepcopy(downsample).to(dtype)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook could keep a reference to what `module` or a submodule takes or returns."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _shortcut(downsample: nn.Module | None, x: Tensor, x_writable: bool) -> tuple[Tensor, bool]:
    """A block's identity branch, and whether the block's last conv may write its result over it.

    Writing over it saves a new output (whose pages would be faulted in afresh on every call): that
    is safe for the output of a fused downsample conv, which nothing else has seen unless a hook is
    registered, and for the block's input when its caller says so.
    """
    if downsample is None:
        return x, x_writable
    return downsample(x), isinstance(downsample, FusedConv2d) and not _hooked(downsample)


def _check_twin(block: nn.Module) -> None:
    problem = block_twin_problem(block)
    if problem is not None:
        raise TypeError(
            f"the fused twin would not compute what this block computes ({problem}); fr.fuse handles such blocks"
        )


class FusedBasicBlock(nn.Module):
    """torchvision's BasicBlock as two fused convs; the residual add and ReLU run in conv2's epilogue."""

    def __init__(self, conv1: FusedConv2d, conv2: FusedConv2d, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample

    @classmethod
    def from_block(cls, block: BasicBlock, backend: str = "auto", dtype=None) -> FusedBasicBlock:
        _check_twin(block)
        return cls(
            FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, backend=backend, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv2, block.bn2, relu=True, backend=backend, dtype=dtype),
            fuse_downsample(block.downsample, backend, dtype),
        )

    def forward(self, x: Tensor, *, x_writable: bool = False) -> Tensor:
        """`x_writable=True`: the caller will not read `x` again, so the block may write over it."""
        identity, writable = _shortcut(self.downsample, x, x_writable)
        return self.conv2(self.conv1(x), residual=identity, residual_writable=writable)


class FusedBottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3) as three fused convs; add + ReLU in conv3's epilogue."""

    def __init__(
        self, conv1: FusedConv2d, conv2: FusedConv2d, conv3: FusedConv2d, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = conv1, conv2, conv3, downsample

    @classmethod
    def from_block(cls, block: Bottleneck, backend: str = "auto", dtype=None) -> FusedBottleneck:
        _check_twin(block)
        return cls(
            FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, backend=backend, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv2, block.bn2, relu=True, backend=backend, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv3, block.bn3, relu=True, backend=backend, dtype=dtype),
            fuse_downsample(block.downsample, backend, dtype),
        )

    def forward(self, x: Tensor, *, x_writable: bool = False) -> Tensor:
        """`x_writable=True`: the caller will not read `x` again, so the block may write over it."""
        identity, writable = _shortcut(self.downsample, x, x_writable)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity, residual_writable=writable)


def fuse_block(block: nn.Module, backend: str = "auto", dtype=None) -> nn.Module:
    """The fused twin of a torchvision BasicBlock or Bottleneck."""
    if isinstance(block, BasicBlock):
        return FusedBasicBlock.from_block(block, backend, dtype)
    if isinstance(block, Bottleneck):
        return FusedBottleneck.from_block(block, backend, dtype)
    raise TypeError(f"expected a torchvision BasicBlock or Bottleneck, got {type(block).__name__}")


class FusedResNet(nn.Module):
    """A whole torchvision ResNet: fused stem (conv + BN + ReLU), maxpool, fused stages, avgpool + fc.

    The input is cast to the model's dtype and converted to channels_last once, at the entry; every
    fused conv then reads and writes channels_last.
    """

    def __init__(self, conv1: FusedConv2d, maxpool: nn.Module, layers: list[nn.Sequential], avgpool, fc):
        super().__init__()
        self.conv1, self.maxpool = conv1, maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = avgpool, fc

    @classmethod
    def from_resnet(cls, model: ResNet, backend: str = "auto", dtype=None) -> FusedResNet:
        layers = [
            nn.Sequential(*(fuse_block(block, backend, dtype) for block in getattr(model, f"layer{i}")))
            for i in range(1, 5)
        ]
        return cls(
            FusedConv2d.from_conv_bn(model.conv1, model.bn1, relu=True, backend=backend, dtype=dtype),
            copy.deepcopy(model.maxpool),
            layers,
            copy.deepcopy(model.avgpool),
            copy.deepcopy(model.fc).to(dtype),
        )

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"FusedResNet takes a 4-D batch of images (N, {self.conv1.in_channels}, H, W), got {got}; "
                "a single image needs a batch dimension: x.unsqueeze(0)"
            )
        x = x.to(dtype=self.conv1.weight.dtype, memory_format=torch.channels_last)
        x = self.maxpool(self.conv1(x))
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if _hooked(self) or not all(type(layer) is nn.Sequential for layer in layers):
            for layer in layers:  # every module is called, so that every hook sees what it expects
                x = layer(x)
        else:
            # Each block's input is the output of the block before, which only this loop holds (no
            # hook has seen it): each block may write its result over its input.
            for block in itertools.chain.from_iterable(layers):
                x = block(x, x_writable=True) if isinstance(block, (FusedBasicBlock, FusedBottleneck)) else block(x)
        # Pooled from NCHW, the features flatten as a plain reshape: from channels_last, an exported
        # graph (ONNX) gathers them element by element, through index arithmetic.
        return self.fc(torch.flatten(self.avgpool(x.contiguous()), 1))
