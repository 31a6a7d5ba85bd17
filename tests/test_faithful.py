"""fr.fuse never changes what a model computes or lets a user observe: hooks, parameters read elsewhere,
custom forwards and odd blocks are either kept working or left unfused, with the reason in fr.inspect.

Each test builds a model as a user would, fuses it, and checks eager's output under the parity rule and
what the model lets a user observe (hook calls, what each hook saw, layouts), or the refusal."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fused_resnet as fr
from fused_resnet.parity import parity, randomize_bn_
from helpers import assert_same_function, fuse_quietly as _fuse


def resnet(generator, arch=torchvision.models.resnet18, **kwargs):
    return randomize_bn_(arch(num_classes=10, **kwargs).eval(), generator)


def images(generator, batch=2, size=64, channels=3):
    return torch.randn(batch, channels, size, size, generator=generator)


def _unfused(model) -> dict[str, str]:
    return {group.name: group.reason for group in fr.inspect(model).unfused}


# Hooks --------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def pre(self, module, args):
        self.calls.append(("pre", args[0].detach().clone()))

    def pre_kwargs(self, module, args, kwargs):
        self.calls.append(("pre_kwargs", args[0].detach().clone()))

    def forward(self, module, args, output):
        self.calls.append(("forward", output.detach().clone()))

    def editing_pre(self, module, args):
        return (args[0] * 0.5,)


WHERE = {
    "conv": lambda m: m.layer2[0].conv1,
    "bn": lambda m: m.layer2[0].bn2,
    "block": lambda m: m.layer3[1],
    "stage": lambda m: m.layer3,
    "stem bn": lambda m: m.bn1,
}


@pytest.mark.parametrize("kind", ["pre", "pre_kwargs", "forward", "editing_pre"])
@pytest.mark.parametrize("where", WHERE)
def test_hooks_on_the_input_model_fire_as_in_eager(where, kind, generator):
    model = resnet(generator)
    recorder = Recorder()
    module = WHERE[where](model)
    if kind == "pre_kwargs":
        module.register_forward_pre_hook(recorder.pre_kwargs, with_kwargs=True)
    elif kind == "forward":
        module.register_forward_hook(recorder.forward)
    else:
        module.register_forward_pre_hook(getattr(recorder, kind))
    fused = _fuse(model)
    x = images(generator)
    with torch.no_grad():
        eager, eager_calls = model(x), recorder.calls
        recorder.calls = []
        ours, fused_calls = fused(x), recorder.calls
    assert parity(ours, eager, copy.deepcopy(model).double()(x.double())).ok
    assert [c[0] for c in fused_calls] == [c[0] for c in eager_calls]
    assert len(eager_calls) == (0 if kind == "editing_pre" else 1)
    for (_, seen_by_fused), (_, seen_by_eager) in zip(fused_calls, eager_calls):
        torch.testing.assert_close(seen_by_fused, seen_by_eager, rtol=1e-4, atol=1e-4)
    if where not in ("block", "stage"):  # a hooked conv or BN stays as it is; a block's or stage's insides fuse
        assert any("hook" in reason for reason in _unfused(model).values())


def test_spectral_norm_old_style_is_left_unfused(generator):
    model = resnet(generator)
    nn.utils.spectral_norm(model.layer1[0].conv1)
    model.eval()
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert "forward pre-hook" in _unfused(model).get("layer1.0.bn1", "")


def test_old_style_weight_norm_gets_an_error_a_user_can_act_on(generator):
    model = resnet(generator)
    nn.utils.weight_norm(model.layer1[0].conv1)
    with pytest.raises(ValueError, match="remove_weight_norm.*parametrizations.weight_norm"):
        fr.fuse(model)


def test_parametrized_weight_norm_is_left_unfused(generator):
    model = resnet(generator)
    nn.utils.parametrizations.weight_norm(model.layer1[0].conv1)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert "parametrization" in _unfused(model)["layer1.0.bn1"]


# Parameters read elsewhere -------------------------------------------------------------------------


class SecondBranch(nn.Module):
    """Reads its conv's weight again, functionally, for a dilated branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu() + F.conv2d(x, self.conv.weight, padding=2, dilation=2)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn_b(self.b(self.bn_a(self.a(x)).relu()))


def test_a_weight_read_directly_in_forward_is_not_folded(generator):
    model = randomize_bn_(SecondBranch().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert "read directly" in _unfused(model)["bn"]


def test_tied_weights_are_not_folded(generator):
    model = randomize_bn_(Tied().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator, channels=8))
    assert "tied" in _unfused(model)["bn_a"] and "tied" in _unfused(model)["bn_b"]


class Untraceable(nn.Module):
    """A forward torch.fx cannot trace (data-dependent) that also reads a child's weight."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.block(x)
        if y.mean() > -100:  # data-dependent: not traceable
            y = y + self.block[0].weight.sum()
        return y


def test_an_untraceable_forward_reading_weights_keeps_them(generator):
    model = randomize_bn_(Untraceable().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert "cannot trace" in _unfused(model)["block.1"]


# Custom forwards ---------------------------------------------------------------------------------


def test_a_resnet_instance_with_its_own_forward_keeps_it(generator):
    model = resnet(generator)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    model.forward = types.MethodType(features, model)
    fused = _fuse(model)
    eager, ours = assert_same_function(model, fused, images(generator))
    assert ours.shape == eager.shape == (2, 512, 2, 2)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: a Conv2d subclass with its own forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_custom_conv_in_a_shortcut_is_not_folded_as_a_plain_one(generator):
    model = resnet(generator)
    model.layer2[0].downsample[0] = StandardisedConv(64, 128, 1, stride=2, bias=False)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))


# Blocks with more than one argument ------------------------------------------------------------


class OptionalShortcut(nn.Module):
    """A DLA-style block: an optional residual tensor, a list of inputs and a flag."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x, shortcut=None, extra: list | None = None, return_pre: bool = False):
        shortcut = x if shortcut is None else shortcut
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        if extra:
            out = out + sum(extra)
        pre = out + shortcut
        return pre if return_pre else pre.relu()


class Tree(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.a, self.b, self.c = OptionalShortcut(channels), OptionalShortcut(channels), OptionalShortcut(channels)

    def forward(self, x):
        x = self.stem_bn(self.stem(x)).relu()
        y = self.a(x)
        z = self.b(y, shortcut=x, return_pre=True)
        return self.c(z, None, [y, x])


def test_blocks_with_optional_list_and_flag_arguments(generator):
    model = randomize_bn_(Tree().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    fr.inspect(model)  # runs, no crash


# Memory formats -----------------------------------------------------------------------------------


class ViewHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        return self.fc(x.view(x.size(0), -1))


def test_view_after_a_fused_conv_works_as_in_eager(generator):
    model = randomize_bn_(ViewHead().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator, size=8))


def test_feature_maps_keep_eagers_memory_format(generator):
    model = resnet(generator, torchvision.models.resnet50)
    extractor = torchvision.models._utils.IntermediateLayerGetter(model, {"layer1": "c2", "layer2": "c3", "layer4": "c5"})
    fused = _fuse(extractor)
    eager, ours = assert_same_function(extractor, fused, images(generator))
    for name in eager:
        assert ours[name].is_contiguous()
    x = images(generator).contiguous(memory_format=torch.channels_last)
    cl_model = extractor.to(memory_format=torch.channels_last)
    fused_cl = _fuse(cl_model)
    with torch.no_grad():
        for name, t in fused_cl(x).items():
            assert t.is_contiguous(memory_format=torch.channels_last) == cl_model(x)[name].is_contiguous(memory_format=torch.channels_last)


# Odd structures -----------------------------------------------------------------------------------


def test_a_resnet_with_an_identity_stage_goes_the_graph_path(generator):
    model = resnet(generator)
    model.layer4 = nn.Identity()
    model.fc = nn.Linear(256, 10)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert not isinstance(fused, fr.FusedResNet)
    assert str(fr.inspect(model))


timm = pytest.importorskip("timm")


def test_frozen_batchnorm_act_is_folded(generator):
    model = randomize_bn_(timm.create_model("resnet18d", num_classes=10).eval(), generator)
    model = timm.layers.freeze_batch_norm_2d(model)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    report = fr.inspect(model)
    assert report.batch_norms_after == 0 and not report.unfused, str(report)


class RootShortcut(nn.Module):
    """The residual add in the root module's own forward, with a conv + BN shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.short, self.short_bn = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + self.short_bn(self.short(x))).relu()


def test_a_shortcut_in_the_root_forward_is_folded(generator):
    model = randomize_bn_(RootShortcut().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    report = fr.inspect(model)
    assert report.batch_norms_after == 0 and not report.unfused, str(report)


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.cat([self.bn(self.a(x)), self.bn(self.b(x))], 1)


def test_a_batchnorm_used_twice_is_reported_as_such(generator):
    model = randomize_bn_(SharedBN().eval(), generator)
    fused = _fuse(model)
    assert_same_function(model, fused, images(generator))
    assert "called 2 times" in _unfused(model)["bn"]


class NormZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc, self.bn1d = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.gn(self.conv(x)).relu()
        return self.bn1d(self.fc(x.mean((2, 3))))


def test_inspect_lists_every_norm_layer_left_running(generator):
    model = randomize_bn_(NormZoo().eval(), generator)
    report = fr.inspect(model)
    unfused = _unfused(model)
    assert set(unfused) == {"gn", "bn1d"}, str(report)
    assert "own statistics" in unfused["gn"] and "BatchNorm1d" in unfused["bn1d"]
    assert "2 left unfused" in str(report)
    with pytest.warns(UserWarning, match="nothing in NormZoo could be fused|2 normalization layers"):
        fr.fuse(model)


def test_the_input_model_is_never_modified(generator):
    model = resnet(generator)
    model.layer1[0].conv1.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = dict(model.layer1[0].conv1._forward_hooks)
    _fuse(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert dict(model.layer1[0].conv1._forward_hooks) == hooks
    assert isinstance(model.layer1[0], BasicBlock) and not isinstance(model.layer1[0], Bottleneck)
