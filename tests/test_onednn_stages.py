"""FusedResNet's stages as straight oneDNN calls (fused_resnet/onednn_stages.py): taken only after the same
call went through the modules, bit for bit what the modules compute, and left for the modules wherever
a hook, autograd, autocast, a replaced module or parameter, or a changed weight could tell them apart."""

from __future__ import annotations

import threading

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet import dispatch, onednn_stages
from fused_resnet.nn import FusedConv2d
from fused_resnet.parity import parity, randomize_bn_

from helpers import onednn_reason

CL = torch.channels_last


class Calls:
    """Counts the stages runs that went straight to oneDNN."""

    def __init__(self, monkeypatch):
        self.straight = 0
        run_blocks = onednn_stages._run_blocks

        def counted(*args):
            self.straight += 1
            return run_blocks(*args)

        monkeypatch.setattr(onednn_stages, "_run_blocks", counted)


def modules_path(model, x):
    """What `model(x)` computes with every block called as a module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn_stages, "run", lambda owner, layers, x, owned, run_modules, *rest, **options: run_modules(x, owned))
        return model(x)


class Case:
    """A randomised ResNet-18, its fused twin, a call counter and an input."""

    def __init__(self, generator, monkeypatch, **fuse_options):
        self.model = randomize_bn_(torchvision.models.resnet18(num_classes=10), generator).eval()
        self.fused = fr.fuse(self.model, **fuse_options)
        self.calls = Calls(monkeypatch)
        self.x = torch.randn(2, 3, 32, 32, generator=generator, dtype=fuse_options.get("dtype", torch.float32))


@pytest.fixture
def case(generator, monkeypatch):
    return Case(generator, monkeypatch)


@pytest.fixture(params=["resnet18", "resnet50"])
def model(request, generator):
    return randomize_bn_(getattr(torchvision.models, request.param)(num_classes=10), generator).eval()


@torch.no_grad()
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 45, 37)])
def test_straight_calls_give_the_modules_result_bit_for_bit(model, shape, memory_format, generator, monkeypatch):
    fused = fr.fuse(model)
    calls = Calls(monkeypatch)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
    with dispatch.record_serving() as served:
        first = fused(x)  # through the modules: every layer validated
    assert calls.straight == 0
    convs = sum(isinstance(m, FusedConv2d) for m in fused.modules())
    with dispatch.record_serving() as served_straight:
        second = fused(x)
    assert calls.straight == 1
    assert served == served_straight == ["onednn"] * convs  # every conv still noted as oneDNN's
    assert torch.equal(first, second)
    assert torch.equal(second, modules_path(fused, x))
    result = parity(second, model(x), model.double()(x.double()))
    assert result.ok, str(result)


@torch.no_grad()
def test_bfloat16_straight_calls_match_the_modules(generator, monkeypatch):
    model = randomize_bn_(torchvision.models.resnet18(num_classes=10), generator).eval()
    missing = onednn_reason(torch.bfloat16)
    if missing is None:
        fused = fr.fuse(model, dtype=torch.bfloat16)
    else:  # the reference serves the convs (fr.fuse says float32 is faster here): never straight
        with pytest.warns(UserWarning, match="float32 is faster"):
            fused = fr.fuse(model, dtype=torch.bfloat16)
    calls = Calls(monkeypatch)
    x = torch.randn(2, 3, 40, 40, generator=generator)
    first, second = fused(x), fused(x)
    assert calls.straight == (1 if missing is None else 0)
    assert second.dtype == torch.bfloat16 and torch.equal(first, second)


@torch.no_grad()
def test_each_new_input_size_goes_through_the_modules_first(model, generator, monkeypatch):
    fused = fr.fuse(model)
    calls = Calls(monkeypatch)
    for size in (32, 48, 32, 48, 33):
        fused(torch.randn(2, 3, size, size, generator=generator))
    assert calls.straight == 2  # the second 32 and the second 48


@torch.no_grad()
def test_hooks_are_called_and_their_tensors_kept(case):
    fused, calls, x = case.fused, case.calls, case.x
    expected = fused(x)
    fused(x)
    assert calls.straight == 1
    seen = []
    handles = [
        fused.layer2[0].conv2.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0], args[0].clone()))),
        fused.layer3[1].register_forward_hook(lambda m, args, out: seen.append(("block", out, out.clone()))),
        torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None),
    ]
    out = fused(x)
    assert calls.straight == 1  # the hooks sent the call through the modules
    assert [kind for kind, _, _ in seen] == ["pre", "block"]
    assert all(torch.equal(t, kept) for _, t, kept in seen)  # nothing a hook saw was written over
    assert torch.equal(out, expected)
    for handle in handles:
        handle.remove()
    fused(x)
    assert calls.straight == 2


@torch.no_grad()
def test_an_edited_weight_is_never_served_stale(case):
    fused, calls, x = case.fused, case.calls, case.x
    fused(x)
    before = fused(x)
    fused.layer3[0].conv1.weight.mul_(-1.5)
    fused.layer4[1].conv2.bias.add_(0.25)
    after = fused(x)
    assert calls.straight == 2
    assert not torch.equal(before, after)
    assert torch.equal(after, modules_path(fused, x))


@torch.no_grad()
def test_a_replaced_module_or_parameter_goes_through_the_modules_again(case, generator):
    model, fused, calls, x = case.model, case.fused, case.calls, case.x
    fused(x)
    fused(x)
    assert calls.straight == 1
    conv = fused.layer2[1].conv1
    fused.layer2[1].conv1 = FusedConv2d.from_conv_bn(model.layer2[1].conv1, model.layer2[1].bn1, relu=True)
    fused(x)
    assert calls.straight == 1  # validated afresh
    fused.layer2[1].conv1 = conv
    fused(x)
    fused.layer1[0].conv2.weight = torch.nn.Parameter(torch.randn(64, 64, 3, 3, generator=generator))
    out = fused(x)
    assert calls.straight == 1
    assert torch.equal(out, modules_path(fused, x))
    # A weight of a shape the network cannot take gets the ops' own error, not oneDNN's.
    fused.layer1[0].conv2.weight = torch.nn.Parameter(torch.randn(64, 32, 3, 3, generator=generator))
    with pytest.raises(ValueError, match="channels"):
        fused(x)


def test_autograd_and_autocast_go_through_the_modules(case):
    fused, calls, x = case.fused, case.calls, case.x
    with torch.no_grad():
        fused(x)
        fused(x)
    assert calls.straight == 1
    out = fused(x)  # gradients on: autograd records the ops
    out.sum().backward()
    assert fused.layer1[0].conv1.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
    assert calls.straight == 1


@torch.no_grad()
def test_the_callers_input_and_the_first_output_are_left_alone(case):
    fused, x = case.fused, case.x.contiguous(memory_format=CL)  # .to() hands this very tensor on
    kept = x.clone()
    first = fused(x)
    first_kept = first.clone()
    second = fused(x)
    assert torch.equal(x, kept) and torch.equal(first, first_kept) and torch.equal(first, second)


@torch.no_grad()
def test_threads_get_their_own_results(case, generator):
    fused = case.fused
    inputs = [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(4)]
    expected = [fused(x) for x in inputs]
    results: dict[int, list] = {}

    def work(i):
        with torch.no_grad():
            results[i] = [fused(inputs[(i + k) % 4]) for k in range(8)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, outs in results.items():
        for k, out in enumerate(outs):
            assert torch.equal(out, expected[(i + k) % 4])


@torch.no_grad()
def test_convs_oneDNN_does_not_serve_never_go_straight(generator, monkeypatch):
    case = Case(generator, monkeypatch, dtype=torch.float64)  # oneDNN has no float64 convolution: the reference serves them
    fused, calls, x = case.fused, case.calls, case.x
    with dispatch.record_serving() as served:
        first, second = fused(x), fused(x)
    assert "onednn" not in served and calls.straight == 0
    assert torch.equal(first, second)


class KeepsItsOutput(torch.nn.Module):
    """A max pool that keeps what it returns (no hook: its own code)."""

    def __init__(self):
        super().__init__()
        self.pool, self.kept = torch.nn.MaxPool2d(3, 2, 1), []

    def forward(self, x):
        out = self.pool(x)
        self.kept.append((out, out.clone()))
        return out


@torch.no_grad()
def test_what_a_module_of_the_users_returned_is_never_written_over(case):
    fused, calls, x = case.fused, case.calls, case.x
    fused.maxpool = KeepsItsOutput()
    fused(x)
    fused(x)
    assert calls.straight == 1
    assert all(torch.equal(out, kept) for out, kept in fused.maxpool.kept)
