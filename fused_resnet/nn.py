"""Drop-in modules: a conv with its BatchNorm folded in, and the ResNet blocks built from it.

Every module here computes the eval-mode function of the modules it replaces. BatchNorm is folded
into fixed weights, so `.train()` cannot bring back batch statistics: a fused model in training
mode computes exactly what it computes in eval mode (like a network with frozen BatchNorm), and
its folded weights and biases stay trainable. `.train()` warns once to say so.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends
from . import onednn_stages, ops
from .layout import LayoutMixin, reader_input
from .memory_format import is_channels_last as _is_channels_last, plain_run, to_channels_last, to_nchw, tracing as _tracing
from .ops import conv2d_bias_act, conv2d_preact
from .fold import bn_scale_shift, fold_bn
from .known_modules import block_twin_problem, foldable_shortcut
from .validation import conv_output_size

# torch.fx records the ops as calls (a traced FusedConv2d stays one fused op, not its Python body).
torch.fx.wrap("conv2d_bias_act")
torch.fx.wrap("conv2d_preact")

_TRAIN_MESSAGE = (
    "fused_resnet modules have their BatchNorm folded into the conv weights: in training mode they "
    "still use the folded running statistics (frozen BatchNorm), never batch statistics"
)
_warned_train = False


OUTPUT_LAYOUTS = ("channels_last", "as_eager")


class FusedConv2d(LayoutMixin, nn.Module):
    """act(conv2d(x, weight) + bias [+ residual]); act is ReLU when `relu`, else the identity.

    `output_layout`: "channels_last" (the fused op's own output, best for a fused network that stays in it)
    or "as_eager" (the memory format eager's conv would give: channels_last for a channels_last input,
    else NCHW), for a conv whose output code outside the fused network may read (`.view` needs it);
    fr.fuse lets such a conv keep channels_last where only fused modules read its output (layout.py)."""

    output_layout = "channels_last"  # modules pickled before the attribute existed

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
        output_layout: str = "channels_last",
    ):
        super().__init__()
        backends.check_name(backend)
        if output_layout not in OUTPUT_LAYOUTS:
            raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {output_layout!r}")
        self.output_layout = output_layout
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
        cls, conv: nn.Conv2d, bn: nn.Module | None = None, *, relu: bool, backend: str = "auto", dtype=None,
        output_layout: str = "channels_last",
    ):
        """The conv, with `bn` (if any) folded in, followed by ReLU if `relu`. Neither module is modified.

        `dtype` (default: the conv's) is the dtype of the folded weights, rounded once from float64.
        `output_layout="as_eager"` gives the layout eager's conv gives (channels_last always when the conv's
        own weight is channels_last, as eager's is then)."""
        if output_layout == "as_eager" and _is_channels_last(conv.weight):
            output_layout = "channels_last"
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
            output_layout=output_layout,
        )
        with torch.no_grad():  # into the module's own parameters, in their layout (the weight's is channels_last)
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)
        return fused

    def output_shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape of this conv's output for a 4-D input `x` (before what `_finish` applies)."""
        sizes = map(conv_output_size, x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        return (x.shape[0], self.out_channels, *sizes)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, *, relu: bool | None = None, residual_writable: bool = False,
        may_stay_channels_last: bool = True,
    ) -> Tensor:
        """`relu=False` leaves out the activation (for a residual the epilogue cannot take).
        `residual_writable=True`: the caller will not read `residual` again (see ops.conv2d_bias_act).
        `may_stay_channels_last=False`: code of the model's own reads the output (see layout.py)."""
        relu = self.relu if relu is None else relu
        x, eager_channels_last = reader_input(x, self._x_note)
        if residual is not None:
            given = residual
            residual = reader_input(residual, self._residual_note)[0]
            residual_writable = residual_writable and residual is given  # never over a twin another reader may read
        # Checked here, after this module's pre-hooks ran: a hook that saw `residual` may keep it.
        residual_writable = residual_writable and residual is not None and not _hooked(self) and not _tracing()
        y = self._finish(conv2d_bias_act(
            x, self.weight, self.bias, residual, relu=relu, residual_writable=residual_writable, **self._conv_arguments()
        ))
        if self.output_layout == "channels_last":
            return y
        return self._eager_output((y,), x, eager_channels_last, may_stay_channels_last)[0]

    def _finish(self, y: Tensor) -> Tensor:
        """What follows the fused op inside this module, in channels_last (nothing here)."""
        return y

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
            + ("" if self.output_layout == "channels_last" else f", output_layout={self.output_layout!r}")
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
                     dtype=None, output_layout: str = "channels_last"):
        """The conv with `bn` (if any) folded in, and `preact_bn` (the BatchNorm that the ReLU of z follows)
        as its per-channel scale and shift. No module is modified."""
        fused = super().from_conv_bn(conv, bn, relu=False, backend=backend, dtype=dtype, output_layout=output_layout)
        scale, shift = bn_scale_shift(preact_bn, dtype=fused.weight.dtype)
        with torch.no_grad():
            fused.preact_scale.copy_(scale)
            fused.preact_shift.copy_(shift)
        return fused

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scale, shift = self.preact_scale, self.preact_shift
        x, eager_channels_last = reader_input(x, self._x_note)
        if residual is not None:
            residual = reader_input(residual, self._residual_note)[0]
        y, z = conv2d_preact(x, self.weight, self.bias, residual, scale=scale, shift=shift, **self._conv_arguments())
        return (y, z) if self.output_layout == "channels_last" else self._eager_output((y, z), x, eager_channels_last)

    def conv(self, x: Tensor) -> Tensor:
        """conv2d(x, weight) + bias alone, for a residual the epilogue cannot take (then see pre_activate)."""
        return super().forward(x, relu=False, may_stay_channels_last=False)

    def pre_activate(self, y: Tensor) -> Tensor:
        """z for a y computed apart."""
        return torch.relu(y * self.preact_scale[:, None, None] + self.preact_shift[:, None, None])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", preact=True"


class FusedConv2dMaxPool(FusedConv2d):
    """A fused conv whose result is max-pooled before it is returned: a stem's conv, BN, ReLU and max
    pool. Pooled in channels_last, so that the stem hands the first block channels_last (max pooling
    gives the same values in either layout)."""

    def __init__(self, *args, pool: nn.MaxPool2d | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = copy.deepcopy(pool) if pool is not None else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @classmethod
    def from_conv_bn_pool(cls, conv: nn.Conv2d, bn: nn.Module | None, pool: nn.MaxPool2d, *, relu: bool, backend: str = "auto",
                          dtype=None, output_layout: str = "channels_last"):
        """The conv with `bn` (if any) folded in, then ReLU if `relu`, then `pool` (copied). No module is modified."""
        fused = cls.from_conv_bn(conv, bn, relu=relu, backend=backend, dtype=dtype, output_layout=output_layout)
        fused.pool = copy.deepcopy(pool)
        return fused

    def _finish(self, y: Tensor) -> Tensor:
        return self.pool(y)


class FusedConv2dAct(FusedConv2d):
    """A fused conv followed by an activation other than ReLU (SiLU, ReLU6, Hardswish...; the module kept as
    `act`), applied inside the module to the channels_last result: an elementwise activation gives the same
    values in either layout, and the fused conv can then hand channels_last on (layout.py)."""

    def __init__(self, *args, act: nn.Module | None = None, **kwargs):
        super().__init__(*args, relu=False, **{k: v for k, v in kwargs.items() if k != "relu"})
        self.act = copy.deepcopy(act) if act is not None else nn.Identity()

    @classmethod
    def from_conv_bn_act(cls, conv: nn.Conv2d, bn: nn.Module | None, act: nn.Module, *, backend: str = "auto", dtype=None,
                         output_layout: str = "channels_last"):
        """The conv with `bn` (if any) folded in, then `act` (copied). No module is modified."""
        fused = cls.from_conv_bn(conv, bn, relu=False, backend=backend, dtype=dtype, output_layout=output_layout)
        fused.act = copy.deepcopy(act)
        return fused

    def _finish(self, y: Tensor) -> Tensor:
        return self.act(y)


def fuse_downsample(downsample: nn.Module | None, backend: str, dtype=None) -> nn.Module | None:
    """A block's shortcut: torchvision's Sequential(conv 1x1, BN) becomes one FusedConv2d without ReLU.

    Any other shortcut is kept as it is (a copy), so the block still computes the same function.
    """
    if downsample is None:
        return None
    pair = foldable_shortcut(downsample)
    if pair is not None:
        return FusedConv2d.from_conv_bn(*pair, relu=False, backend=backend, dtype=dtype)
    warnings.warn(
        f"fused_resnet: shortcut {type(downsample).__name__} is not torchvision's (conv, BatchNorm) pair; kept unfused",
        stacklevel=3,
    )
    return copy.deepcopy(downsample).to(dtype)


def _hooked(module: nn.Module, own_only: bool = False) -> bool:
    """Whether a forward hook or pre-hook (with or without kwargs, global, on `module` or, unless `own_only`,
    on a submodule) could see, and keep, what `module` takes or returns. Asked at each call, where a write
    over a tensor is decided."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in ((module,) if own_only else module.modules()))


def _residual_of(block: nn.Module, x: Tensor, x_writable: bool) -> tuple[Tensor, bool]:
    """A block's residual branch, and whether its last conv may write its result over it.

    Writing over it saves a new output (whose pages would be faulted in afresh on every call). It is
    safe for the output of a fused downsample conv that no hook has seen, and for the block's input
    when its caller owns it (`x_writable`) and no hook of the block, or of a module in it, has seen it.
    """
    downsample = block.downsample
    if downsample is None:
        return x, x_writable and not _hooked(block)
    return downsample(x), isinstance(downsample, FusedConv2d) and not _hooked(downsample)


def _check_twin(block: nn.Module) -> None:
    problem = block_twin_problem(block)
    if problem is not None:
        raise TypeError(
            f"the fused twin would not compute what this block computes ({problem}); fr.fuse handles such blocks"
        )


class _FusedResidualBlock(LayoutMixin, nn.Module):
    """A torchvision block as fused convs conv1 .. convN; the residual add and ReLU run in convN's epilogue.

    `output_layout` as FusedConv2d's: "as_eager" returns the block's output in the memory format the
    eager block gives (the layout of its input, or channels_last when its conv weights were), while the
    convs inside stay channels_last."""

    CONVS: tuple[str, ...]
    TWIN: type
    output_layout = "channels_last"

    def __init__(self, *convs: FusedConv2d, downsample: nn.Module | None = None, output_layout: str = "channels_last"):
        super().__init__()
        if len(convs) != len(self.CONVS):
            raise TypeError(f"{type(self).__name__} takes {len(self.CONVS)} convs, got {len(convs)}")
        if output_layout not in OUTPUT_LAYOUTS:
            raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {output_layout!r}")
        for name, conv in zip(self.CONVS, convs):
            setattr(self, name, conv)
        self.downsample, self.output_layout = downsample, output_layout

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto", dtype=None, output_layout: str = "channels_last"):
        _check_twin(block)
        if output_layout == "as_eager" and _is_channels_last(block.conv1.weight):
            output_layout = "channels_last"
        convs = (
            FusedConv2d.from_conv_bn(getattr(block, name), getattr(block, f"bn{name[-1]}"), relu=True, backend=backend, dtype=dtype)
            for name in cls.CONVS
        )
        return cls(*convs, downsample=fuse_downsample(block.downsample, backend, dtype), output_layout=output_layout)

    def forward(self, x: Tensor, *, x_writable: bool = False) -> Tensor:
        """`x_writable=True`: the caller will not read `x` again, so the block may write over it."""
        given = x
        x, eager_channels_last = reader_input(x, self._x_note)
        out = self.forward_channels_last(x, x_writable and x is given)  # never over a twin another reader may read
        return out if self.output_layout == "channels_last" else self._eager_output((out,), x, eager_channels_last)[0]

    def forward_channels_last(self, x: Tensor, x_writable: bool = False) -> Tensor:
        """The block's result as its last conv returns it (channels_last), whatever `output_layout` says."""
        out = x
        for name in self.CONVS[:-1]:
            out = getattr(self, name)(out)
        residual, writable = _residual_of(self, x, x_writable)
        return getattr(self, self.CONVS[-1])(out, residual=residual, residual_writable=writable)


class FusedBasicBlock(_FusedResidualBlock):
    """torchvision's BasicBlock as two fused convs; the residual add and ReLU run in conv2's epilogue."""

    CONVS = ("conv1", "conv2")
    TWIN = BasicBlock


class FusedBottleneck(_FusedResidualBlock):
    """torchvision's Bottleneck (v1.5: stride on the 3x3) as three fused convs; add + ReLU in conv3's epilogue."""

    CONVS = ("conv1", "conv2", "conv3")
    TWIN = Bottleneck


RESIDUAL_BLOCKS = (FusedBasicBlock, FusedBottleneck)


class FusedStage(nn.Sequential):
    """An nn.Sequential of fused residual blocks (a ResNet stage in a model fr.fuse rewrote). Called as
    it is, its blocks hand each other their channels_last results directly, and only the stage's output
    takes eager's layout (or what the layout plan allows: the last block's `_eager_output`); on the CPU
    the blocks' convs are straight oneDNN calls (onednn_stages.py).

    Taken only where nothing could tell it from nn.Sequential's loop: no hook of any kind, global or on
    a block (hooks inside the blocks run, their convs being called as modules), every child a
    FusedBasicBlock / FusedBottleneck with its class's forward, and nothing traces or transforms the
    call. Else it is nn.Sequential's loop, each block called as a module."""

    def forward(self, x):
        blocks = tuple(self._modules.values())
        if not (blocks and isinstance(x, Tensor) and plain_run() and not ops.has_global_hooks()) or any(
            type(block) not in RESIDUAL_BLOCKS or "forward" in block.__dict__ or ops.has_hooks(block) for block in blocks
        ):
            return super().forward(x)
        x, eager_channels_last = reader_input(x, blocks[0]._x_note)
        if eager_channels_last is None:
            eager_channels_last = _is_channels_last(x)
        # A block built from channels_last weights returns channels_last, as eager's does; the rest keep their input's.
        eager_channels_last = eager_channels_last or any(block.output_layout == "channels_last" for block in blocks)
        y = onednn_stages.run(self, (self,), x, False, self._run_blocks, RESIDUAL_BLOCKS, FusedConv2d, blocks_as_modules=False)
        last = blocks[-1]
        return y if last.output_layout == "channels_last" else last._eager_output((y,), x, eager_channels_last)[0]

    def _run_blocks(self, x: Tensor, owned: bool) -> Tensor:
        """The blocks' channels_last results handed on, each block writing over its input where only this loop holds it."""
        for block in self._modules.values():
            x = block.forward_channels_last(x, owned)
            owned = not _hooked(block)  # no hook inside the block saw its output
        return x


def fuse_block(block: nn.Module, backend: str = "auto", dtype=None, output_layout: str = "channels_last") -> nn.Module:
    """The fused twin of a torchvision BasicBlock or Bottleneck."""
    for fused in (FusedBasicBlock, FusedBottleneck):
        if isinstance(block, fused.TWIN):
            return fused.from_block(block, backend, dtype, output_layout)
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
        tracing = _tracing()
        if not tracing and (not isinstance(x, Tensor) or x.dim() != 4):
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"FusedResNet takes a 4-D batch of images (N, {self.conv1.in_channels}, H, W), got {got}; "
                "a single image needs a batch dimension: x.unsqueeze(0)"
            )
        x = to_channels_last(x.to(self.conv1.weight.dtype))
        x = self.maxpool(self.conv1(x))
        # Whether only this loop holds x: then the next fused block may write its result over it. Decided
        # at each step from the hooks registered now (a hook registered while this runs is seen at the
        # next step), and never for a tensor a module other than our own blocks returned.
        owned = not tracing and type(self.maxpool) is nn.MaxPool2d and not _hooked(self.maxpool)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if tracing or not all(type(layer) is nn.Sequential and not ops.has_hooks(layer) and "forward" not in layer.__dict__ for layer in layers):
            x = self._run_stages(x, owned)
        else:  # straight oneDNN calls where they compute the same (onednn_stages.py)
            x = onednn_stages.run(self, layers, x, owned, self._run_stages, RESIDUAL_BLOCKS, FusedConv2d)
        # Pooled from NCHW, the features flatten as a plain reshape: from channels_last, an exported
        # graph (ONNX) gathers them element by element, through index arithmetic.
        return self.fc(torch.flatten(self.avgpool(to_nchw(x)), 1))

    def _run_stages(self, x: Tensor, owned: bool) -> Tensor:
        """The four stages, module by module. `owned`: only this call holds x (see forward)."""
        tracing = _tracing()
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if tracing or type(layer) is not nn.Sequential or _hooked(layer, own_only=True):
                x, owned = layer(x), False  # called as a module, so that every hook sees what it expects
                continue
            for block in layer:
                if type(block) in (FusedBasicBlock, FusedBottleneck) and block.output_layout == "channels_last":
                    x = block(x, x_writable=owned)
                    owned = not _hooked(block)  # no hook of the block, or of its last conv, saw its output
                else:  # a module the user placed here may keep what it takes or returns
                    x, owned = block(x), False
        return x


def refresh(model: nn.Module) -> nn.Module:
    """Makes the next call of `model` derive afresh every copy kept of its weights (oneDNN's packed
    weights, autocast casts...). Needed only after writes PyTorch counts nowhere: through `.data`
    (`w.data.mul_(2)`) or through a NumPy or DLPack view of a weight. Every other change (in-place ops,
    `load_state_dict`, `.to()`, assigning a new tensor or parameter) is seen without it. Returns `model`."""
    ops.forget(model.parameters())
    return model
