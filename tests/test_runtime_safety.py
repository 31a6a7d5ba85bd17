"""Speed without risk: what a fused model writes in place, and the weights it keeps packed, can never
change what a user, a hook or another module sees.

- A block's last conv writes its result over the residual only when nothing but the fused model's own
  loop can read it: never over a tensor a hook (of any kind, on any module that saw it, or global), a
  module the user placed in a stage, a wrapper or a feature extractor keeps, whatever thread registers it.
- A packed weight is never older than its parameter: dtype round trips, `.data =`, swapped parameters,
  `load_state_dict(assign=True)`; edits PyTorch counts nowhere are seen after fr.refresh.
- One packed weight serves every batch size (no repacking under dynamic batching).
- Autocast, forward-mode AD, the serving record and torch.fx behave as in eager.
"""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fused_resnet as fr
from fused_resnet import backends, dispatch
from fused_resnet.backends import onednn
from fused_resnet.parity import parity, randomize_bn_

pytestmark = pytest.mark.skipif(
    backends.get("onednn").unavailable_reason(torch.device("cpu")) is not None, reason="PyTorch built without oneDNN"
)


def resnet(generator, arch=torchvision.models.resnet18):
    return randomize_bn_(arch(num_classes=10).eval(), generator)


def images(generator, batch=2, size=64):
    return torch.randn(batch, 3, size, size, generator=generator)


class Keeper:
    """A hook (or tap) that keeps every tensor it is shown, with a copy of its values at that moment."""

    def __init__(self):
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(self, t):
        if isinstance(t, torch.Tensor):
            self.kept.append((t, t.detach().clone()))

    def assert_unchanged(self):
        assert self.kept, "the hook never ran"
        for i, (tensor, seen) in enumerate(self.kept):
            assert torch.equal(tensor, seen), f"tensor {i} of {len(self.kept)} kept was written over"


def _pre_hook(keeper):
    def hook(module, args):
        for a in args:
            keeper.keep(a)

    return hook


def _pre_hook_with_kwargs(keeper):
    def hook(module, args, kwargs):
        for t in (*args, *kwargs.values()):
            keeper.keep(t)

    return hook


def _forward_hook(keeper):
    def hook(module, args, output):
        for t in args:
            keeper.keep(t)
        keeper.keep(output)

    return hook


HOOKED_MODULES = {
    "block": lambda m: m.layer1[1],
    "block's last conv": lambda m: m.layer1[1].conv2,
    "downsample": lambda m: m.layer2[0].downsample,
    "stage": lambda m: m.layer2,
    "first conv of a block": lambda m: m.layer3[1].conv1,
}
HOOK_KINDS = ["pre", "pre_with_kwargs", "forward", "forward_with_kwargs"]


def _register(module, kind, keeper):
    if kind == "pre":
        return module.register_forward_pre_hook(_pre_hook(keeper))
    if kind == "pre_with_kwargs":
        return module.register_forward_pre_hook(_pre_hook_with_kwargs(keeper), with_kwargs=True)
    if kind == "forward":
        return module.register_forward_hook(_forward_hook(keeper))

    def hook(module, args, kwargs, output):
        for t in (*args, *kwargs.values(), output):
            keeper.keep(t)

    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize("where", HOOKED_MODULES)
@torch.no_grad()
def test_no_tensor_a_hook_keeps_is_written_over(where, kind, generator):
    model = resnet(generator)
    fused = fr.fuse(model)
    keeper = Keeper()
    handle = _register(HOOKED_MODULES[where](fused), kind, keeper)
    x = images(generator)
    out = fused(x)
    handle.remove()
    keeper.assert_unchanged()
    assert parity(out, model(x), model.double()(x.double())).ok


@torch.no_grad()
def test_global_hooks_see_tensors_that_stay_as_they_were(generator):
    fused = fr.fuse(resnet(generator))
    keeper = Keeper()
    handles = [
        nn.modules.module.register_module_forward_hook(_forward_hook(keeper)),
        nn.modules.module.register_module_forward_pre_hook(_pre_hook(keeper)),
    ]
    try:
        fused(images(generator))
    finally:
        for handle in handles:
            handle.remove()
    keeper.assert_unchanged()


class Tap(nn.Module):
    """A feature tap a user places between two blocks: it keeps what passes through."""

    def __init__(self):
        super().__init__()
        self.keeper = Keeper()

    def forward(self, x):
        self.keeper.keep(x)
        return x


class KeepOutput(nn.Module):
    """A wrapper that keeps its block's output for an auxiliary head."""

    def __init__(self, block):
        super().__init__()
        self.block, self.keeper = block, Keeper()

    def forward(self, x):
        out = self.block(x)
        self.keeper.keep(out)
        return out


@torch.no_grad()
def test_a_tap_or_wrapper_placed_in_a_stage_keeps_what_it_saw(generator):
    model = resnet(generator)
    fused = fr.fuse(model)
    tap = Tap()
    fused.layer1 = nn.Sequential(fused.layer1[0], tap, fused.layer1[1])
    wrapper = KeepOutput(fused.layer3[0])
    fused.layer3[0] = wrapper
    x = images(generator)
    out = fused(x)
    tap.keeper.assert_unchanged()
    wrapper.keeper.assert_unchanged()
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_feature_extractor_and_fx_trace_of_a_fused_resnet(generator):
    model = resnet(generator)
    fused = fr.fuse(model)
    x = images(generator)
    traced = torch.fx.symbolic_trace(fused)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)
    nodes = ["layer1.0", "layer1", "layer2.0", "layer3", "layer4"]
    features = create_feature_extractor(fused, {n: n for n in nodes})(x)
    expected = create_feature_extractor(model, {n: n for n in nodes})(x)
    kept = {n: t.clone() for n, t in features.items()}
    for n in nodes:
        torch.testing.assert_close(features[n], expected[n], rtol=1e-4, atol=1e-4)
        assert torch.equal(features[n], kept[n])


@torch.no_grad()
def test_hooks_registered_by_another_thread_during_forward(generator):
    """One thread runs the model while another registers and removes hooks that keep the block inputs
    they see: no kept tensor is ever written over."""
    fused = fr.fuse(resnet(generator))
    x = images(generator, batch=1, size=48)
    keeper, stop = Keeper(), threading.Event()
    errors = []

    def run():
        try:
            for _ in range(30):
                fused(x)
        except Exception as error:  # reported below
            errors.append(error)
        finally:
            stop.set()

    runner = threading.Thread(target=run)
    runner.start()
    blocks = [b for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4) for b in layer]
    rounds = 0
    while not stop.is_set() and rounds < 2000:
        block = blocks[rounds % len(blocks)]
        handle = block.register_forward_pre_hook(_pre_hook(keeper))
        handle.remove()
        rounds += 1
    runner.join(timeout=600)
    assert not errors, errors
    if keeper.kept:
        keeper.assert_unchanged()


# Packed weights ---------------------------------------------------------------------------------


def fused_conv(generator, channels=8):
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(channels)).eval(), generator)[0]
    return fr.FusedConv2d.from_conv_bn(conv, bn, relu=True, backend="onednn")


def reference(module, x):
    return fr.ops.conv2d_bias_act(x, module.weight, module.bias, padding=module.padding, relu=module.relu, backend="torch")


@torch.no_grad()
def test_a_dtype_round_trip_never_serves_the_old_weights(generator):
    """`.to(bfloat16).to(float32)` with no call between may put the new storage at the old address:
    the packed copy holds the old storage, so it cannot."""
    x = torch.randn(2, 8, 6, 6, generator=generator)
    for trial in range(50):
        module = fused_conv(generator)
        module(x)
        module.to(torch.bfloat16).to(torch.float32)  # weights now rounded to bfloat16's precision
        assert torch.equal(module(x), reference(module, x)), f"trial {trial}: stale packed weight"


@torch.no_grad()
def test_every_counted_change_of_the_weights_is_seen(generator):
    module, other = fused_conv(generator), fused_conv(generator)
    x = torch.randn(2, 8, 6, 6, generator=generator)
    module(x)
    module.weight.data = other.weight.data.clone()  # a new storage
    assert torch.equal(module(x), reference(module, x))
    module.weight = nn.Parameter(other.weight.detach() * 2)  # a swapped parameter
    assert torch.equal(module(x), reference(module, x))
    module.load_state_dict({k: v * 3 for k, v in other.state_dict().items()}, assign=True)
    assert torch.equal(module(x), reference(module, x))
    module.weight.mul_(-1)  # in place, on the parameter
    assert torch.equal(module(x), reference(module, x))
    module.weight.detach().add_(1)  # in place, through a detached view (shares the version counter)
    assert torch.equal(module(x), reference(module, x))


@torch.no_grad()
def test_uncounted_writes_are_seen_after_refresh(generator):
    """Writes through `.data` and NumPy bump no version counter: fr.refresh makes the next call see them."""
    module = fused_conv(generator)
    x = torch.randn(2, 8, 6, 6, generator=generator)
    module(x)
    module.weight.data.mul_(2)
    assert torch.equal(fr.refresh(module)(x), reference(module, x))
    module.weight.detach().numpy()[:] *= -1
    assert torch.equal(fr.refresh(module)(x), reference(module, x))


@torch.no_grad()
def test_packed_copies_go_with_their_weight_and_never_serve_another(generator):
    """The packed copies are found by the weight's id: they are dropped when the weight is freed, and
    an entry left under an id that another weight now has is not served to it."""
    x = torch.randn(2, 8, 6, 6, generator=generator)
    module = fused_conv(generator)
    module(x)
    gone = id(module.weight)
    assert gone in onednn._packed._entries
    del module
    gc.collect()
    assert gone not in onednn._packed._entries
    first, second = fused_conv(generator), fused_conv(generator)
    first(x)
    # As if `second` had taken the id of a freed `first` whose entry stayed.
    onednn._packed._entries[id(second.weight)] = onednn._packed._entries[id(first.weight)]
    assert torch.equal(second(x), reference(second, x))
    assert torch.equal(first(x), reference(first, x))


@torch.no_grad()
def test_dynamic_batch_sizes_share_one_packed_weight(generator):
    fused = fr.fuse(resnet(generator))
    convs = [m for m in fused.modules() if isinstance(m, fr.FusedConv2d)]
    fused(images(generator, batch=1))
    before = onednn.repacks()
    for batch in [3, 5, 2, 7, 1, 4, 6, 3, 5]:
        fused(images(generator, batch=batch))
    assert onednn.repacks() == before, "a new batch size repacked weights"
    assert all(len(onednn._packed.copies(c.weight)) == 1 for c in convs)


# Autocast, forward-mode AD, serving record -------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("graph_path", [False, True], ids=["FusedResNet", "graph pass"])
def test_autocast_computes_where_eager_does_in_its_dtype(graph_path, generator):
    model = resnet(generator)
    if graph_path:  # an unfused conv feeds a fused one: the fused op must take its bfloat16 output
        model.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False, padding_mode="reflect")
    fused = fr.fuse(model)
    x = images(generator)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = out.dtype

        return hook

    fused.layer4.register_forward_hook(record("fused"))
    model.layer4.register_forward_hook(record("eager"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), model(x)
    assert seen["fused"] == seen["eager"] == torch.bfloat16
    assert out.dtype == expected.dtype
    assert parity(out, expected, model.double()(x.double())).ok


def test_forward_mode_ad_gives_eager_tangents(generator):
    """The tangent through a fused model passes the parity rule against eager's (float64 reference)."""
    model = resnet(generator)
    fused = fr.fuse(model)
    x, tangent = images(generator), images(generator)
    _, fused_tangent = torch.func.jvp(fused, (x,), (tangent,))
    _, eager_tangent = torch.func.jvp(model, (x,), (tangent,))
    _, exact = torch.func.jvp(copy.deepcopy(model).double(), (x.double(),), (tangent.double(),))
    assert fused_tangent.abs().max() > 0
    result = parity(fused_tangent, eager_tangent, exact)
    assert result.ok, str(result)


@torch.no_grad()
def test_the_serving_record_sees_its_own_thread_only(generator):
    fused = fr.fuse(resnet(generator))
    x = images(generator, batch=1, size=32)
    calls = sum(isinstance(m, fr.FusedConv2d) for m in fused.modules())
    started, done = threading.Event(), threading.Event()

    def other():
        started.set()
        while not done.is_set():
            fused(x)

    thread = threading.Thread(target=other)
    thread.start()
    started.wait()
    try:
        with dispatch.record_serving() as served:
            fused(x)
    finally:
        done.set()
        thread.join()
    assert len(served) == calls
