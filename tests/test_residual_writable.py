"""Writing a conv's result over its residual (residual_writable): the result is the same, only memory
the caller gave up is written, and everything a caller or a hook may still read is left as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet import backends, ops
from fused_resnet.nn import FusedBottleneck
from fused_resnet.parity import randomize_bn_

pytestmark = pytest.mark.skipif(
    backends.get("onednn").unavailable_reason(torch.device("cpu")) is not None, reason="PyTorch built without oneDNN"
)
CL = torch.channels_last


def conv_case(generator, groups=1, memory_format=CL, channels=8):
    x = torch.randn(2, channels, 7, 5, generator=generator).contiguous(memory_format=memory_format)
    weight = torch.randn(channels, channels // groups, 3, 3, generator=generator) * 0.2
    bias = torch.randn(channels, generator=generator)
    residual = torch.randn(2, channels, 7, 5, generator=generator).contiguous(memory_format=memory_format)
    return x, weight, bias, residual, dict(padding=1, groups=groups)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("relu", [True, False])
def test_onednn_writes_the_result_over_the_residual(groups, relu, generator):
    x, weight, bias, residual, conv = conv_case(generator, groups)
    expected = ops.conv2d_bias_act(x, weight, bias, residual, relu=relu, backend="torch", **conv)
    given = residual.clone()
    out = ops.conv2d_bias_act(x, weight, bias, given, relu=relu, backend="onednn", residual_writable=True, **conv)
    assert out.data_ptr() == given.data_ptr()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["onednn", "torch"])
def test_without_permission_the_residual_is_left_alone(backend, generator):
    x, weight, bias, residual, conv = conv_case(generator)
    given = residual.clone()
    out = ops.conv2d_bias_act(x, weight, bias, given, backend=backend, **conv)
    assert torch.equal(given, residual) and out.data_ptr() != given.data_ptr()


def test_a_backend_that_cannot_write_over_it_leaves_it_alone(generator):
    x, weight, bias, residual, conv = conv_case(generator)
    given = residual.clone()
    ops.conv2d_bias_act(x, weight, bias, given, backend="torch", residual_writable=True, **conv)
    assert torch.equal(given, residual)


def test_a_residual_sharing_memory_with_the_input_is_not_written(generator):
    x, weight, bias, _, conv = conv_case(generator)
    kept = x.clone()
    out = ops.conv2d_bias_act(x, weight, bias, x, backend="onednn", residual_writable=True, **conv)
    assert torch.equal(x, kept)
    torch.testing.assert_close(out, ops.conv2d_bias_act(kept, weight, bias, kept, backend="torch", **conv))


def test_a_residual_not_in_channels_last_is_not_written(generator):
    x, weight, bias, residual, conv = conv_case(generator, memory_format=torch.contiguous_format)
    given = residual.clone()
    out = ops.conv2d_bias_act(x, weight, bias, given, backend="onednn", residual_writable=True, **conv)
    assert torch.equal(given, residual)
    torch.testing.assert_close(out, ops.conv2d_bias_act(x, weight, bias, residual, backend="torch", **conv))


def test_under_autograd_the_residual_is_left_alone_and_gradients_flow(generator):
    x, weight, bias, residual, conv = conv_case(generator)
    given = residual.clone().requires_grad_()
    out = ops.conv2d_bias_act(x, weight, bias, given, backend="onednn", residual_writable=True, **conv)
    out.sum().backward()
    assert torch.equal(given.detach(), residual)
    torch.testing.assert_close(given.grad, (out > 0).to(out.dtype))


def test_the_flag_must_be_a_bool(generator):
    x, weight, bias, residual, conv = conv_case(generator)
    with pytest.raises(TypeError, match="residual_writable must be a bool"):
        ops.conv2d_bias_act(x, weight, bias, residual, residual_writable=1, **conv)


@pytest.fixture
def resnet18(generator):
    return randomize_bn_(torchvision.models.resnet18(num_classes=10), generator).eval()


@torch.no_grad()
def test_the_callers_input_is_never_written(resnet18, generator):
    fused = fr.fuse(resnet18)
    x = torch.randn(2, 3, 32, 32, generator=generator).contiguous(memory_format=CL)  # .to() hands this very tensor on
    kept = x.clone()
    fused(x)
    assert torch.equal(x, kept)


@torch.no_grad()
@pytest.mark.parametrize("hook_on", ["block", "last conv of a block", "layer", "globally"])
def test_outputs_a_hook_has_seen_are_never_overwritten(hook_on, resnet18, generator):
    fused = fr.fuse(resnet18)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    expected = fused(x)
    seen = []

    def keep(module, args, output):
        seen.append((output, output.clone()))

    target = {"block": fused.layer1[0], "last conv of a block": fused.layer1[0].conv2, "layer": fused.layer1}
    if hook_on == "globally":
        handle = torch.nn.modules.module.register_module_forward_hook(keep)
    else:
        handle = target[hook_on].register_forward_hook(keep)
    try:
        out = fused(x)
    finally:
        handle.remove()
    assert seen
    for output, copy_when_seen in seen:
        assert torch.equal(output, copy_when_seen)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@torch.no_grad()
def test_a_hooked_downsample_output_is_never_overwritten(generator):
    block = randomize_bn_(torchvision.models.resnet50().layer2[0], generator).eval()
    fused = FusedBottleneck.from_block(block)
    seen = []
    fused.downsample.register_forward_hook(lambda m, a, out: seen.append((out, out.clone())))
    x = torch.randn(1, 256, 9, 9, generator=generator)
    fused(x)
    (output, copy_when_seen), = seen
    assert torch.equal(output, copy_when_seen)


@torch.no_grad()
def test_a_block_called_alone_leaves_its_input_alone(generator):
    block = randomize_bn_(torchvision.models.resnet50().layer1[1], generator).eval()
    fused = FusedBottleneck.from_block(block)
    x = torch.randn(1, 256, 6, 7, generator=generator).contiguous(memory_format=CL)
    kept = x.clone()
    out = fused(x)
    assert torch.equal(x, kept)
    torch.testing.assert_close(out, block(kept), rtol=1e-5, atol=1e-5)
