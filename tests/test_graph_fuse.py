"""fr.fuse beyond plain torchvision ResNets: timm ResNets (B/C/D/T, SE, ECA, ResNeXt, pre-activation v2),
detection and segmentation models, mobilenet_v2, vgg11_bn, user blocks that subclass torchvision's.

For each model: parity with eager (docs/design.md's rule, randomised BN, fp32 CPU), the number of batch-norm
operators that still run (0 wherever every BatchNorm directly follows a conv), the input model unchanged.
"""

import copy
from collections import Counter

import pytest
import timm
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from fused_resnet.fold import BN_TYPES
from fused_resnet.fusion_report import batch_norm_ops
from fused_resnet.architectures import OTHER_MODELS, create
from fused_resnet.parity import parity, randomize_bn_


class SqueezeExcitationBottleneck(Bottleneck):
    """A user's block: torchvision's Bottleneck with squeeze-excitation before the residual add."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        width = self.conv3.out_channels
        self.se_reduce = nn.Conv2d(width, width // 4, 1)
        self.se_expand = nn.Conv2d(width // 4, width, 1)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        gate = torch.sigmoid(self.se_expand(self.relu(self.se_reduce(out.mean((2, 3), keepdim=True)))))
        return self.relu(out * gate + identity)


# name (see fused_resnet.architectures) -> BN operators expected at run time after fusing
MODELS = {
    **{f"timm:{name}": 0 for name in (
        "resnet18", "resnet50", "resnet50c", "resnet50d", "resnet26t", "seresnet50", "ecaresnet50d", "resnext50_32x4d",
    )},
    # Each block's first BatchNorm + ReLU acts on the residual stream (after an add, not a conv), as does
    # the final norm: the conv whose epilogue adds that stream writes it as a second output, except for the
    # first block's, which follows the stem's maxpool: 1 of the 17 stays.
    "timm:resnetv2_50": 1,
    **dict.fromkeys(OTHER_MODELS, 0),
}
SLOW = {"deeplabv3_resnet50", "vgg11_bn", "fasterrcnn_fpn_backbone", "fasterrcnn_fpn_backbone_batchnorm"}


def _outputs(result):
    """A model's tensors: a tensor itself, or the values of the dict that detection/segmentation models return."""
    return list(result.values()) if isinstance(result, dict) else [result]


def _assert_parity(model, fused, x):
    with torch.no_grad():
        result = parity(fused(x), model(x), copy.deepcopy(model).double()(x.double()))
    assert result.ok, result


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()]


def _check_fused(model, x, bn_ops_left=0):
    """fr.fuse(model): parity with eager, `bn_ops_left` batch-norm operators at run time, `model` unchanged."""
    states, modules = _state(model)
    fused = fr.fuse(model, backend="torch")
    assert batch_norm_ops(model, x) == sum(isinstance(m, BN_TYPES) for m in model.modules())  # the counter sees BN
    assert batch_norm_ops(fused, x) == bn_ops_left
    with torch.no_grad():
        reference, eager, ours = (_outputs(r) for r in (copy.deepcopy(model).double()(x.double()), model(x), fused(x)))
    assert len(ours) == len(eager)
    for out, eager_out, ref in zip(ours, eager, reference):
        result = parity(out, eager_out, ref)
        assert result.ok, result
    after_states, after_modules = _state(model)
    assert after_modules == modules
    assert after_states.keys() == states.keys() and all(torch.equal(states[k], after_states[k]) for k in states)
    return fused


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_model_is_fused_with_parity_and_no_batch_norm_left(name):
    torch.manual_seed(0)
    model = randomize_bn_(create(name), torch.Generator().manual_seed(1))
    _check_fused(model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), MODELS[name])


def test_squeeze_excitation_subclass_keeps_its_gate():
    model = randomize_bn_(ResNet(SqueezeExcitationBottleneck, [1, 2, 1, 1], num_classes=10).eval())
    fused = _check_fused(model, torch.randn(2, 3, 48, 48))
    assert not any(isinstance(m, fr.FusedBottleneck) for m in fused.modules())
    names = {name for name, _ in fused.named_modules()}
    assert all(f"layer{i}.0.se_reduce" in names and f"layer{i}.0.se_expand" in names for i in range(1, 5))


def test_block_subclass_with_another_activation_is_not_taken_for_torchvision_block():
    """Same forward as torchvision's, but a SiLU where torchvision has ReLU: the fused twin would be wrong."""
    model = randomize_bn_(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval())
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        layer[0].relu = nn.SiLU()
    fused = fr.fuse(model, backend="torch")
    assert not isinstance(fused, fr.FusedResNet)
    assert not any(isinstance(m, fr.FusedBottleneck) for m in fused.modules())
    silu_blocks = {name.split(".")[0] for name, m in fused.named_modules() if isinstance(m, nn.SiLU)}
    assert silu_blocks == {"layer1", "layer2", "layer3", "layer4"}  # kept as a module or inside a FusedConv2dAct
    x = torch.randn(2, 3, 32, 32)
    _assert_parity(model, fused, x)


def test_non_relu_activation_is_kept_after_the_folded_conv():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 5, 1)).eval())
    fused = fr.fuse(model, backend="torch")
    assert [type(m) for m in fused] == [fr.FusedConv2dAct, nn.Identity, nn.Identity, nn.Conv2d]
    assert not fused[0].relu and type(fused[0].act) is nn.SiLU
    x = torch.randn(1, 3, 9, 7)
    _assert_parity(model, fused, x)


def test_conv_output_used_twice_is_not_fused_away():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn_(TwoUses().eval())
    with pytest.warns(UserWarning, match="nothing in TwoUses could be fused"):
        fused, groups = fr.convert.fuse_with_report(model, backend="torch")
    assert [(g.name, g.fused) for g in groups] == [("bn", False)]
    assert "used 2 times" in groups[0].reason
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


class _NormFreeEnd(nn.Module):
    """A GroupNorm ResNet-v2 bottleneck's end: GroupNorm -> ReLU -> conv, whose output meets the shortcut
    (and, with `relu`, a ReLU after the add)."""

    def __init__(self, relu: bool):
        super().__init__()
        self.norm, self.conv, self.relu = nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1), relu

    def forward(self, x):
        y = self.conv(torch.relu(self.norm(x))) + x
        return torch.relu(y) if self.relu else y


def test_a_conv_whose_only_fusion_is_the_residual_add_runs_as_it_is():
    model = _NormFreeEnd(relu=False).eval()
    with pytest.warns(UserWarning, match="a conv followed by a residual add alone runs faster as it is"):
        fused = fr.fuse(model)
    assert not any(isinstance(m, fr.FusedConv2d) for m in fused.modules())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    # With the ReLU after the add, the conv takes both (two passes saved) and is fused.
    model = _NormFreeEnd(relu=True).eval()
    fused = fr.fuse(model)
    assert sum(isinstance(m, fr.FusedConv2d) for m in fused.modules()) == 1
    _assert_parity(model, fused, x)


def test_shared_conv_called_twice_is_fused_at_both_call_sites():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(self.relu(self.bn(self.conv(x))))))

    model = randomize_bn_(Twice().eval())
    fused = fr.fuse(model, backend="torch")
    x = torch.randn(2, 4, 6, 6)
    assert batch_norm_ops(fused, x) == 0
    _assert_parity(model, fused, x)


def test_frozen_batch_norm_counter_counts_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4)).eval()
    assert batch_norm_ops(model, torch.randn(1, 3, 2, 2)) == 1
    assert batch_norm_ops(fr.fuse(model, backend="torch"), torch.randn(1, 3, 2, 2)) == 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 33, 31), (1, 3, 1, 1)])
def test_timm_resnet50d_layouts_and_odd_sizes(layout, shape):
    model = randomize_bn_(timm.create_model("resnet50d", pretrained=False, num_classes=10).eval())
    fused = fr.fuse(model, backend="torch")
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_parity(model, fused, x)


def test_grouped_and_dilated_convs_fold():
    model = randomize_bn_(nn.Sequential(
        nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.Conv2d(12, 7, 3, padding=1, groups=1), nn.BatchNorm2d(7),
    ).eval())
    fused = fr.fuse(model, backend="torch")
    x = torch.randn(2, 12, 11, 9)
    assert batch_norm_ops(fused, x) == 0
    _assert_parity(model, fused, x)


def test_timm_state_dict_round_trips_bit_for_bit(tmp_path):
    fused = fr.fuse(randomize_bn_(timm.create_model("resnet26t", pretrained=False).eval()), dtype=torch.float16)
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    fresh = fr.fuse(randomize_bn_(timm.create_model("resnet26t", pretrained=False).eval()), dtype=torch.float16)
    fresh.load_state_dict(torch.load(tmp_path / "fused.pt", weights_only=True))
    bits = lambda t: t.detach().contiguous().view(torch.uint8)  # noqa: E731
    assert fresh.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(bits(v), bits(fresh.state_dict()[k])) for k, v in fused.state_dict().items())


def test_training_mode_is_refused_with_the_reason():
    model = timm.create_model("resnet18", pretrained=False).train()
    with pytest.raises(ValueError, match="20 BatchNorm modules .* training mode.*model.eval"):
        fr.fuse(model)


@pytest.mark.parametrize(
    "conv, bn, reason",
    [
        (nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6), "padding_mode='reflect'"),
        (nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False), "no running statistics"),
    ],
    ids=["reflect_padding", "no_running_statistics"],
)
def test_group_that_cannot_fold_is_left_unfused_and_reported(conv, bn, reason):
    model = randomize_bn_(nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)).eval())
    fused = fr.fuse(model, backend="torch")
    report = fr.inspect(model)
    assert [(g.name, g.fused) for g in report.groups] == [("3", True), ("1", False)]
    assert reason in report.groups[1].reason and reason in str(report)
    assert report.batch_norms_before == 2 and report.batch_norms_after == 1
    assert type(fused[0]) is nn.Conv2d and type(fused[1]) is type(bn)
    _assert_parity(model, fused, torch.randn(2, 3, 7, 5))


def test_inspect_names_each_group_and_leaves_the_model_alone():
    model = randomize_bn_(timm.create_model("resnet50d", pretrained=False, num_classes=10).eval())
    states, modules = _state(model)
    report = fr.inspect(model)
    assert report.batch_norms_before == 55 and report.batch_norms_after == 0 and not report.unfused
    patterns = Counter(g.pattern for g in report.groups)
    # deep stem: 2 conv+bn+relu, then conv+bn+relu+maxpool; 16 blocks: 2 conv+bn+relu and conv3+bn+add+relu;
    # 4 avgpool+conv+bn shortcuts
    assert patterns == {"conv+bn+relu": 2 + 2 * 16, "conv+bn+relu+maxpool": 1, "conv+bn+add+relu": 16, "conv+bn": 4}
    assert _state(model)[1] == modules and all(torch.equal(v, states[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50d", "resnetv2_50"])
def test_triton_backend_agrees_under_the_interpreter(poisoned_outputs, name, monkeypatch):
    """Every fused conv of the graph pass runs the Triton kernel (on the CPU through Triton's interpreter,
    which takes minutes per model: the smallest input the model takes, 8x8), each output poisoned first."""
    model = randomize_bn_(timm.create_model(name, pretrained=False, num_classes=10).eval())
    fused = fr.fuse(model, backend="triton")
    assert all(m.backend == "triton" for m in fused.modules() if isinstance(m, fr.FusedConv2d))
    _assert_parity(model, fused, torch.randn(1, 3, 8, 8))


def test_from_block_refuses_a_block_its_twin_would_compute_wrongly():
    block = SqueezeExcitationBottleneck(64, 16).eval()
    with pytest.raises(TypeError, match="overrides Bottleneck.forward"):
        fr.FusedBottleneck.from_block(block)


def test_residual_computed_by_an_earlier_fused_chain_and_used_twice():
    """The shortcut's conv + BN is fused first; the later chain's residual add must read the fused value."""

    class SharedShortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.bn_a = nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6)
            self.conv_b, self.bn_b, self.relu = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()

        def forward(self, x):
            shortcut = self.bn_a(self.conv_a(x))
            return self.relu(self.bn_b(self.conv_b(x)) + shortcut) + shortcut

    model = randomize_bn_(SharedShortcut().eval())
    fused = _check_fused(model, torch.randn(2, 5, 7, 6))
    assert [g.pattern for g in fr.inspect(model).groups] == ["conv+bn", "conv+bn+add+relu"]
    assert isinstance(fused, torch.fx.GraphModule)


@pytest.mark.parametrize("kind", ["broadcast", "wider dtype"])
def test_a_residual_the_epilogue_cannot_take_is_added_as_the_model_wrote_it(kind):
    """conv -> BN -> add -> ReLU whose other operand is not a tensor of the output's shape and dtype
    (a per-channel broadcast, a float64 tensor): fused, and the add keeps the model's semantics."""

    class OddResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
            shape = (1, 6, 1, 1) if kind == "broadcast" else (2, 6, 5, 7)
            self.register_buffer("offset", torch.randn(shape, dtype=torch.float32 if kind == "broadcast" else torch.float64))

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + self.offset)

    model = randomize_bn_(OddResidual().eval())
    x = torch.randn(2, 4, 5, 7)
    fused = fr.fuse(model)
    assert [g.pattern for g in fr.inspect(model).groups if g.fused] == ["conv+bn+add+relu"]
    with torch.no_grad():
        expected, out = model(x), fused(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, 2, 1),
    nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.MaxPool2d(2, dilation=2),
    nn.MaxPool2d((3, 2), (1, 2), (1, 0)),
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_stems_max_pool_is_taken_into_its_fused_conv(pool, layout):
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), pool, nn.Conv2d(8, 4, 1)).eval())
    fused = fr.fuse(model, backend="torch")
    assert [type(m) for m in fused] == [fr.FusedConv2dMaxPool, nn.Identity, nn.Identity, nn.Identity, nn.Conv2d]
    assert [g.pattern for g in fr.inspect(model).groups if g.fused] == ["conv+bn+relu+maxpool"]
    x = torch.randn(2, 3, 13, 11).contiguous(memory_format=layout)
    _assert_parity(model, fused, x)
    with torch.no_grad():
        x[0, 0, 3, 3] = float("nan")
        assert fused(x).isnan().sum() == model(x).isnan().sum() > 0
        assert fused[0](x).is_contiguous(memory_format=layout) and model[:4](x).is_contiguous(memory_format=layout)


@pytest.mark.parametrize("make", [lambda: nn.MaxPool2d(3, 2, 1, return_indices=True), "hooked"])
def test_a_max_pool_that_returns_indices_or_has_a_hook_stays(make):
    pool = nn.MaxPool2d(3, 2, 1) if make == "hooked" else make()
    if make == "hooked":
        pool.register_forward_hook(lambda m, a, out: None)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), pool).eval())
    fused = fr.fuse(model, backend="torch")
    assert type(fused[0]) is fr.FusedConv2d and fused[3] is not pool and type(fused[3]) is nn.MaxPool2d
