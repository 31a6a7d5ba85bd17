"""Fused modules hand each other channels_last tensors where only fused modules read them, and whatever
code of the model's own, a hook or a caller sees has eager's memory format (fused_resnet/layout.py).

Each test asserts eager's values and layouts, and, where the plan should save conversions, counts the
copies ATen makes, against the same fused model with its plan removed."""

from __future__ import annotations

import copy
import pickle
import threading
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models._utils import IntermediateLayerGetter

from fused_resnet import cpu_extension
from fused_resnet.layout_plan import plan_layouts, remove_plan
from fused_resnet.memory_format import channels_last_copy, to_nchw
from fused_resnet.parity import randomize_bn_
from helpers import assert_same_function, cpu_extension_ops, fuse_quietly


def extractor(generator, arch=torchvision.models.resnet18):
    backbone = randomize_bn_(arch().eval(), generator)
    return IntermediateLayerGetter(backbone, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})


def images(generator, batch=2, size=64):
    return torch.randn(batch, 3, size, size, generator=generator)


def unplanned(fused: nn.Module) -> nn.Module:
    """The same fused model returning eager's layout from every fused module, converting at each boundary."""
    return remove_plan(copy.deepcopy(fused))


class _CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.elements[func.__name__.split(".")[0]] += args[0].numel() if args and isinstance(args[0], torch.Tensor) else 0
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def copies(model, x) -> int:
    """How many elements one call copies (clones and copies: the layout conversions, by ATen or the CPU extension)."""
    with _CountCopies() as counter:
        model(x)
    kinds = ("clone", "copy_", "channels_last_to_contiguous", "contiguous_to_channels_last")
    return sum(counter.elements[kind] for kind in kinds)


class LayoutTap(nn.Module):
    """A module of the user's own that records whether what it is given is contiguous (NCHW)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.is_contiguous())
        return x


def test_a_feature_extractor_converts_only_what_it_returns(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    x = images(generator)
    assert_same_function(model, fused, x)
    assert_same_function(model, fused, x.contiguous(memory_format=torch.channels_last))
    plain = unplanned(fused)
    assert plan_layouts(copy.deepcopy(fused)) == 5  # the stem and the first block of each stage hand over channels_last
    with torch.no_grad():
        for name, value in fused(x).items():
            assert torch.equal(value, plain(x)[name])
    # Unplanned: each of the 8 blocks converts its output to NCHW and the next converts it back.
    # Planned: the 4 returned maps are converted once each, nothing else (the stem pools in channels_last).
    with torch.no_grad():
        returned = sum(t.numel() for t in fused(x).values())
    assert copies(fused, x) == returned < copies(plain, x)
    assert type(fused.conv1).__name__ == "FusedConv2dMaxPool" and type(fused.maxpool) is nn.Identity


def test_hooks_registered_after_fusing_see_eagers_layout(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    x = images(generator)
    seen = {}

    def note(key, tensor):  # returns None: the hooks only look
        seen.setdefault(key, tensor.is_contiguous())

    fused.layer1[0].register_forward_hook(lambda m, a, out: note("block output", out))
    fused.layer2[1].register_forward_pre_hook(lambda m, a: note("block input", a[0]))
    fused.layer3.register_forward_pre_hook(lambda m, a, k: note("stage input", a[0]), with_kwargs=True)
    assert_same_function(model, fused, x)
    assert seen == {"block output": True, "block input": True, "stage input": True}
    global_seen = []
    blocks = {id(m) for path in ("layer1", "layer2", "layer3", "layer4") for m in (fused.get_submodule(path), *fused.get_submodule(path))}

    def look(module, args, out):  # the modules eager has too (the convs inside a fused block are its own)
        if id(module) in blocks:
            global_seen.append(out.is_contiguous())

    handle = nn.modules.module.register_module_forward_hook(look)
    try:
        assert_same_function(model, fused, x)
    finally:
        handle.remove()
    assert global_seen and all(global_seen)


def test_a_block_or_stage_called_on_its_own_returns_eagers_layout(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    x = torch.randn(2, 64, 16, 16, generator=generator)
    with torch.no_grad():
        for path in ("layer1", "layer1.0", "layer1.1"):
            ours, eager = fused.get_submodule(path)(x), model.get_submodule(path)(x)
            assert ours.is_contiguous() and torch.allclose(ours, eager, atol=1e-4, rtol=1e-4), path
        alone = copy.deepcopy(fused.layer1[0])  # a copy of the producer alone: its plan is not its own
        assert alone(x).is_contiguous()


def test_modules_inserted_or_forwards_replaced_after_fusing_see_eagers_layout(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    x = images(generator)
    tap, eager_tap = LayoutTap(), LayoutTap()
    fused.layer1.insert(1, tap)
    model.layer1.insert(1, eager_tap)
    assert_same_function(model, fused, x)
    assert tap.seen and tap.seen == eager_tap.seen
    fused, model = fuse_quietly(extractor(generator)), extractor(generator)
    seen = []

    def forward(self, x):  # a stage whose forward the user replaced, reading what the first block returns
        x = self[0](x)
        seen.append(x.is_contiguous())
        return self[1](x)

    fused.layer2.forward = forward.__get__(fused.layer2)
    with torch.no_grad():
        fused(x)
    assert seen == [True]


def test_a_model_writing_over_a_returned_map_before_a_fused_block_reads_it(generator):
    """The fused reader of a converted map uses the channels_last original only while the map is unchanged."""

    class Doubling(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.layer1, self.layer2 = backbone.layer1, backbone.layer2

        def forward(self, x):
            a = self.layer1(x)
            kept = a.clone()
            a.mul_(2)  # in place, between the block that returned it and the one that reads it
            return self.layer2(a), kept

    model = Doubling(randomize_bn_(torchvision.models.resnet18().eval(), generator)).eval()
    fused = fuse_quietly(model)
    assert_same_function(model, fused, torch.randn(2, 64, 16, 16, generator=generator))


def test_threads_with_different_input_layouts_each_get_their_own(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    inputs = [images(generator), images(generator).contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    failures = []

    def run(i):
        with torch.no_grad():
            for _ in range(6):
                out = fused(inputs[i])
                for name, value in out.items():
                    if value.is_contiguous() != expected[i][name].is_contiguous() or not torch.allclose(value, expected[i][name], atol=1e-3, rtol=1e-3):
                        failures.append((i, name))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_copies_keep_the_plan(generator, copy_by):
    model = extractor(generator)
    fused = fuse_quietly(model)
    copied = copy.deepcopy(fused) if copy_by == "deepcopy" else pickle.loads(pickle.dumps(fused))
    x = images(generator)
    assert_same_function(model, copied, x)
    assert copies(copied, x) == copies(fused, x)


def test_inference_mode_autograd_and_tracing_see_eagers_layout(generator):
    model = extractor(generator)
    fused = fuse_quietly(model)
    x = images(generator)
    with torch.inference_mode():
        assert_same_function(model, fused, x)
    # Gradients through the channels_last originals equal those through the converted maps.
    plain = unplanned(fused)
    grads = []
    for m in (fused, plain):
        xr = x.clone().requires_grad_()
        sum(v.square().sum() for v in m(xr).values()).backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())  # summed in another order
    compiled = torch.compile(fused, backend="eager")
    with torch.no_grad():
        for name, value in compiled(x).items():
            assert value.is_contiguous(), name


# Odd sizes, and copies of over 1 MiB into NCHW, stored past the caches in 32-byte rows (48x48), in 16-byte
# halves (38x38) and not at all (35x29: rows of an odd length).
CONVERSION_SHAPES = [
    (2, 256, 7, 5), (1, 3, 1, 1), (0, 8, 4, 4), (3, 1, 9, 2), (2, 5, 33, 1), (2, 67, 13, 11), (1, 3, 224, 224), (2, 64, 48, 48),
    (1, 260, 35, 29), (2, 104, 38, 38),
]


@pytest.fixture(params=["extension", "aten"])
def copies_by(request, monkeypatch):
    """The conversions by the CPU extension's ops, and by ATen's copies (where the extension is missing)."""
    if request.param == "extension":
        cpu_extension_ops()
    else:
        monkeypatch.setattr(cpu_extension, "ops", lambda: None)
    return request.param


@pytest.mark.parametrize("shape", CONVERSION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.uint8])
def test_the_conversions_equal_atens(shape, dtype, copies_by):
    t = (torch.randn(shape) * 50).to(dtype).contiguous(memory_format=torch.channels_last)
    out = to_nchw(t)
    assert out.is_contiguous() and out.dtype == dtype and torch.equal(out, t.contiguous())
    back = channels_last_copy(out)
    n, c, h, w = shape
    assert back.stride() == (h * w * c, 1, w * c, c) and torch.equal(back, t)  # the exact strides oneDNN reads
    with torch.inference_mode():
        assert torch.equal(to_nchw(t), t) and torch.equal(channels_last_copy(out), t)
    leaf = t.clone().requires_grad_() if dtype.is_floating_point else None
    if leaf is not None:
        converted = to_nchw(leaf)
        assert converted.requires_grad and converted.is_contiguous()  # autograd records it: ATen's own copy


@pytest.mark.parametrize("shape", [(2, 24, 9, 7), (2, 128, 32, 40)])
def test_the_conversions_keep_every_bit(shape, copies_by):
    """NaN payloads, signed zeros, infinities and denormals come through as the same bits."""
    bits = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    bits[0, :4, 0, 0] = torch.tensor([0x7FC00001, 0x7F800001, -0x80000000, 0x00000001], dtype=torch.int32)  # NaNs, -0.0, denormal
    t = bits.view(torch.float32).contiguous(memory_format=torch.channels_last)
    assert torch.equal(to_nchw(t).view(torch.int32), bits)
    assert torch.equal(channels_last_copy(bits.view(torch.float32)).view(torch.int32), t.view(torch.int32))


def test_the_conversions_of_views_and_odd_strides(copies_by):
    """A view at an offset, size-1 dimensions with either layout's strides, and non-dense tensors."""
    base = torch.randn(3, 16, 10, 12)
    view = base.contiguous(memory_format=torch.channels_last)[1:]  # channels_last at a storage offset
    assert torch.equal(to_nchw(view), base[1:])
    assert torch.equal(channels_last_copy(base[1:]), base[1:])
    one = torch.randn(4, 5, 1, 1)  # both layouts at once: no copy is needed, but a dense one must come back
    assert torch.equal(channels_last_copy(one), one) and channels_last_copy(one).stride() == (5, 1, 5, 5)
    sliced = base[:, ::2]  # neither layout: ATen's copies
    assert torch.equal(to_nchw(sliced), sliced) and to_nchw(sliced).is_contiguous()
    assert torch.equal(channels_last_copy(sliced), sliced)


def test_the_extension_ops_refuse_what_they_cannot_copy():
    ops = cpu_extension_ops()
    with pytest.raises(RuntimeError, match="expected a dense channels_last tensor"):
        ops.channels_last_to_contiguous(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="expected a dense contiguous"):
        ops.contiguous_to_channels_last(torch.randn(2, 6, 4, 5)[:, ::2])
    with pytest.raises(RuntimeError, match="expected a 4-D tensor"):
        ops.contiguous_to_channels_last(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="16 bytes are not supported"):
        ops.contiguous_to_channels_last(torch.randn(2, 3, 4, 5, dtype=torch.complex128))
