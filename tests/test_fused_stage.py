"""FusedStage (fused_resnet/nn.py): the stages fr.fuse makes of a model's nn.Sequential of torchvision
blocks hand channels_last on inside and return eager's layout, compute bit for bit what nn.Sequential's
loop over the same blocks computes, and go back to that loop wherever a hook, a replaced or added
module, a trace or a transform could tell them apart."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import fused_resnet as fr
from fused_resnet import dispatch, onednn_stages
from fused_resnet.nn import FusedStage
from fused_resnet.parity import parity, randomize_bn_

from helpers import assert_same_function, onednn_reason

CL = torch.channels_last
LAYERS = ("layer1", "layer2", "layer3", "layer4")


class Straight:
    """Counts the calls of FusedStage that handed channels_last on inside (its own loop, not nn.Sequential's)."""

    def __init__(self, monkeypatch):
        self.calls = self.onednn = 0  # stage calls that handed channels_last on; of those, straight oneDNN runs
        run, run_blocks = onednn_stages.run, onednn_stages._run_blocks

        def counted(owner, *args, **options):
            self.calls += isinstance(owner, FusedStage)
            return run(owner, *args, **options)

        def counted_blocks(*args):
            self.onednn += 1
            return run_blocks(*args)

        monkeypatch.setattr(onednn_stages, "run", counted)
        monkeypatch.setattr(onednn_stages, "_run_blocks", counted_blocks)


def sequential_loop(fused, *inputs):
    """What `fused(*inputs)` computes with every FusedStage running nn.Sequential's loop."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedStage, "forward", nn.Sequential.forward)
        return fused(*inputs)


def backbone(arch, generator):
    model = randomize_bn_(getattr(torchvision.models, arch)(), generator).eval()
    return IntermediateLayerGetter(model, {name: name for name in LAYERS})


@pytest.fixture(params=["resnet18", "resnet50"])
def features(request, generator):
    return backbone(request.param, generator)


class Case:
    """A randomised ResNet-18 backbone, its fused twin, a counter of straight stage runs and an input."""

    def __init__(self, generator, monkeypatch):
        self.features = backbone("resnet18", generator)
        self.fused = fr.fuse(self.features)
        self.straight = Straight(monkeypatch)
        self.x = torch.randn(2, 3, 32, 32, generator=generator)


@pytest.fixture
def case(generator, monkeypatch):
    return Case(generator, monkeypatch)


def outputs_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() for k in a)


@torch.no_grad()
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_a_backbone_stages_are_fused_stages_computing_what_the_loop_computes(features, memory_format, generator, monkeypatch):
    fused = fr.fuse(features)
    assert all(type(getattr(fused, name)) is FusedStage for name in LAYERS)
    assert all(type(getattr(features, name)) is nn.Sequential for name in LAYERS)  # the input model is left as it is
    assert all(getattr(fused, name)._modules.keys() == getattr(features, name)._modules.keys() for name in LAYERS)
    straight = Straight(monkeypatch)
    for shape in [(2, 3, 64, 64), (1, 3, 45, 37)]:
        x = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
        kept = x.clone()
        _, first = assert_same_function(features, fused, x)  # values and every map's memory format
        second = fused(x)
        assert outputs_equal(first, second) and outputs_equal(second, sequential_loop(fused, x))
        assert torch.equal(x, kept)
    assert straight.calls == 2 * 2 * len(LAYERS)
    assert straight.onednn == (2 * len(LAYERS) if onednn_reason(torch.float32) is None else 0)  # each shape's second call


@torch.no_grad()
def test_a_stage_called_on_its_own_returns_its_inputs_layout_and_leaves_the_input_alone(generator, monkeypatch):
    features = backbone("resnet18", generator)
    fused = fr.fuse(features)
    straight = Straight(monkeypatch)
    for name in ("layer1", "layer2"):  # layer1's first block adds its input itself (no downsample)
        channels = getattr(features, name)[0].conv1.in_channels
        for memory_format in (torch.contiguous_format, CL):
            x = torch.randn(2, channels, 20, 20, generator=generator).contiguous(memory_format=memory_format)
            kept = x.clone()
            _, first = assert_same_function(getattr(features, name), getattr(fused, name), x)
            with dispatch.record_serving() as served:
                second = getattr(fused, name)(x)  # straight to oneDNN where it served the first call
            assert torch.equal(first, second) and first.stride() == second.stride() and torch.equal(x, kept)
            assert served and set(served) == {"onednn" if onednn_reason(torch.float32) is None else "reference"}
    assert straight.calls == 8 and straight.onednn == (4 if onednn_reason(torch.float32) is None else 0)


@torch.no_grad()
def test_block_hooks_fire_and_see_what_eager_gives(generator, monkeypatch):
    features = backbone("resnet50", generator)
    fused = fr.fuse(features)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    expected = sequential_loop(fused, x)
    straight = Straight(monkeypatch)
    seen = {}

    def keep(name):
        return lambda module, args, out: seen.setdefault(name, []).append((out, out.clone()))

    for model, tag in ((features, "eager"), (fused, "fused")):
        model.layer2[1].register_forward_hook(keep(tag))
    # A hook inside a block, on a fused conv: the stage still runs its own loop, which calls the convs as modules.
    fused.layer3[1].conv3.register_forward_hook(keep("conv"))  # its output is the block's, which the next block adds
    out, eager = fused(x), features(x)
    expected_fp64 = copy.deepcopy(features).double()(x.double())
    assert outputs_equal(out, expected)
    assert straight.calls == len(LAYERS) - 1  # layer2, whose block has a hook, ran nn.Sequential's loop
    assert [len(seen[kind]) for kind in ("eager", "fused", "conv")] == [2, 1, 1]  # eager's: its float64 copy's too
    seen["eager"].pop()
    (eager_out, _), (fused_out, _) = seen["eager"][0], seen["fused"][0]
    assert fused_out.is_contiguous() and eager_out.is_contiguous()  # the block's output in eager's layout
    assert torch.allclose(fused_out, eager_out, rtol=1e-4, atol=1e-4)
    sequential_loop(fused, x)
    assert torch.equal(seen["conv"][0][0], seen["conv"][1][0])  # the loop's conv saw the same
    assert all(torch.equal(t, kept) for kind in ("fused", "conv") for t, kept in seen[kind])  # nothing a hook kept was written over
    assert all(parity(out[k], eager[k], expected_fp64[k]).ok for k in eager)


@torch.no_grad()
def test_a_pre_hook_that_edits_a_blocks_input_is_honoured(generator):
    features = backbone("resnet18", generator)
    fused = fr.fuse(features)
    for model in (features, fused):
        model.layer3[1].register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    assert_same_function(features, fused, torch.randn(2, 3, 48, 48, generator=generator))


@torch.no_grad()
def test_global_hooks_send_every_stage_through_the_loop(case):
    fused, straight, x = case.fused, case.straight, case.x
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    try:
        fused(x)
    finally:
        handle.remove()
    assert straight.calls == 0
    assert calls.count("FusedBasicBlock") == 8 and calls.count("FusedStage") == 4


@torch.no_grad()
def test_an_added_or_replaced_module_or_a_blocks_own_forward_is_called(case):
    features, fused, straight, x = case.features, case.fused, case.straight, case.x

    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, t):
            self.seen.append(t.is_contiguous())
            return t

    taps = [Tap(), Tap()]
    features.layer2.append(taps[0])
    fused.layer2.append(taps[1])
    block_calls = []

    def own_forward(block, t):
        block_calls.append(type(block).__name__)
        return type(block).forward(block, t)

    for model in (features, fused):
        model.layer3[0].forward = types.MethodType(own_forward, model.layer3[0])
    assert_same_function(features, fused, x)
    assert taps[1].seen == taps[0].seen == [True]  # NCHW, as eager hands it
    assert sorted(block_calls) == ["BasicBlock", "BasicBlock", "FusedBasicBlock"]  # eager, its float64 copy, ours
    assert straight.calls == 2  # layer1 and layer4


@torch.no_grad()
def test_copies_and_pickles_compute_the_same(generator):
    features = backbone("resnet18", generator)
    fused = fr.fuse(features)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    expected = fused(x)
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(twin.layer1) is FusedStage
        assert outputs_equal(twin(x), expected)


def test_gradients_flow_through_a_fused_stage(generator, monkeypatch):
    features = backbone("resnet18", generator)
    fused = fr.fuse(features)
    straight = Straight(monkeypatch)
    x = torch.randn(2, 3, 32, 32, generator=generator, requires_grad=True)
    out = fused(x)
    with torch.no_grad():
        assert outputs_equal({k: v.detach() for k, v in out.items()}, sequential_loop(fused, x.detach()))
    sum(v.sum() for v in out.values()).backward()
    assert x.grad is not None and fused.layer1[0].conv1.weight.grad is not None
    assert straight.calls == len(LAYERS)


def test_only_plain_sequentials_of_fused_blocks_become_stages(generator):
    model = randomize_bn_(torchvision.models.resnet18(), generator).eval()
    mixed = nn.Sequential(model.layer1[0], nn.Identity(), model.layer1[1])

    class OwnSequential(nn.Sequential):
        pass

    own = OwnSequential(*model.layer2)
    wrapper = nn.ModuleDict({"mixed": mixed, "own": own, "plain": nn.Sequential(*model.layer3)})
    fused = fr.fuse(wrapper)
    assert type(fused["mixed"]) is nn.Sequential and type(fused["own"]) is OwnSequential
    assert type(fused["plain"]) is FusedStage
