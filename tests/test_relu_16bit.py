"""ReLU on bfloat16 and float16 bits (csrc/cpu/relu_16bit.cpp), which the oneDNN backend runs for each
of its 16-bit ReLUs (after a convolution, a standalone add, a pre-activation): torch.relu's value for
every one of the 65,536 bit patterns of each dtype."""

import pytest
import torch

from fused_resnet import cpu_extension
from fused_resnet.backends import onednn
from fused_resnet.call import ConvCall

from helpers import cpu_extension_ops, onednn_reason

DTYPES = [torch.bfloat16, torch.float16]


def every_bit_pattern(dtype):
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def assert_relu_of(x, out):
    """`out` is torch.relu(x): the same bits wherever that is not NaN (-0.0 and +inf included), and NaN
    where it is NaN. (A NaN's payload is not compared: ATen's relu itself changes it, bf16 0xFF81 to
    0xFFFF and fp16 0xFC01 to 0xFE01.)"""
    expected = torch.relu(x)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bit_pattern_gets_torch_relus_value(dtype):
    x = every_bit_pattern(dtype)
    out = cpu_extension_ops().relu_16bit_(x.clone())
    assert_relu_of(x, out)
    # Not vacuous: negatives, -inf, -0.0 and NaN are all there, and the negatives were cleared.
    assert (x < 0).sum() > 30000 and x.isnan().sum() > 200
    assert (out[(x < 0)] == 0).all() and torch.signbit(out[x == 0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_on_a_channels_last_tensor_split_across_threads(dtype):
    x = torch.randn(3, 37, 41, 43).to(dtype).contiguous(memory_format=torch.channels_last)  # odd sizes, > 1 grain
    in_memory_order = x.permute(0, 2, 3, 1).view(-1)
    in_memory_order[::97] = float("nan")
    in_memory_order[1::89] = float("-inf")
    y = x.clone()
    out = cpu_extension_ops().relu_16bit_(y)
    assert out.data_ptr() == y.data_ptr() and out.stride() == x.stride()
    assert_relu_of(x, y)


def test_what_it_does_not_take_is_refused_with_a_reason():
    ops = cpu_extension_ops()
    with pytest.raises(RuntimeError, match="expected a dense bfloat16 or float16 tensor.*Float"):
        ops.relu_16bit_(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="expected a dense bfloat16 or float16 tensor.*strides"):
        ops.relu_16bit_(torch.randn(4, 8).to(torch.bfloat16)[:, ::2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extension", ["built", "missing"])
def test_the_onednn_backends_relu_is_torch_relu(dtype, extension, monkeypatch):
    reason = onednn_reason(dtype)
    if reason is not None:
        pytest.skip(f"oneDNN has no {dtype} convolution here ({reason}); tests/test_cpu_isa.py checks the refusal")
    if extension == "missing":
        monkeypatch.setattr(cpu_extension, "ops", lambda: None)  # ATen's relu_ then
    x = torch.randn(2, 16, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 4] = float("nan")
    x[1, 5, 2, 2] = float("inf")
    weight = torch.randn(24, 16, 3, 3).to(dtype)
    bias = torch.randn(24).to(dtype)
    call = ConvCall(x, weight, bias, None, (1, 1), (1, 1), (1, 1), 1, True)
    pre = onednn.conv2d_bias_act(None, call.replace(relu=False))
    out = onednn.conv2d_bias_act(None, call)
    assert pre.isnan().any() and (pre < 0).any()
    assert_relu_of(pre, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_onednn_backends_add_relu_and_preact_relu_are_torch_relu(dtype):
    reason = onednn_reason(dtype)
    if reason is not None:
        pytest.skip(f"oneDNN has no {dtype} convolution here ({reason}); tests/test_cpu_isa.py checks the refusal")
    x = torch.randn(2, 16, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 16, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 4], x[1, 5, 2, 2], y[1, 7, 1, 1] = float("nan"), float("-inf"), float("inf")
    out = torch.empty_like(x)
    onednn.add_relu(out, x, y)
    assert_relu_of(x + y, out)
    weight = torch.randn(16, 16, 3, 3).to(dtype)
    scale, shift = torch.randn(16).to(dtype), torch.randn(16).to(dtype)
    call = ConvCall(x, weight, None, None, (1, 1), (1, 1), (1, 1), 1, False, scale, shift)
    pre, z = onednn.conv2d_preact(None, torch.empty_like(x), call)
    affine = torch.addcmul(shift, pre.permute(0, 2, 3, 1), scale).permute(0, 3, 1, 2)
    assert affine.isnan().any() and (affine < 0).any()
    assert_relu_of(affine, z)
