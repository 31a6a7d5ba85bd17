"""fold_bn: every BatchNorm flavour, against eager conv -> bn in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from fused_resnet.parity import randomize_bn_

from helpers import cpu_extension_ops


def _bn(kind: str, channels: int, eps: float) -> nn.Module:
    if kind == "batchnorm":
        bn = nn.BatchNorm2d(channels, eps=eps)
    elif kind == "no_affine":
        bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
    elif kind == "frozen":
        bn = FrozenBatchNorm2d(channels, eps=eps)
    elif kind == "sync":
        bn = nn.SyncBatchNorm(channels, eps=eps)
    return randomize_bn_(bn.eval(), torch.Generator().manual_seed(channels))


@pytest.mark.parametrize("kind", ["batchnorm", "no_affine", "frozen", "sync"])
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_fold_matches_conv_then_bn(kind, conv_bias, eps):
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=conv_bias).double()
    bn = _bn(kind, 10, eps).double()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    weight, bias = fr.fold_bn(conv, bn)
    with torch.no_grad():
        expected = bn(conv(x))
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected, rtol=1e-12, atol=1e-12)


def test_fold_without_bn_returns_the_conv_itself():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    weight, bias = fr.fold_bn(conv)
    assert torch.equal(weight, conv.weight) and torch.equal(bias, torch.zeros(4))
    assert weight.data_ptr() != conv.weight.data_ptr()  # a copy, so the caller may modify it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fold_is_computed_in_float64_then_cast(dtype):
    conv = nn.Conv2d(8, 8, 3).to(dtype)
    bn = _bn("batchnorm", 8, 1e-5).to(dtype)
    weight, bias = fr.fold_bn(conv, bn)
    weight64, bias64 = fr.fold_bn(conv.double(), bn.double())
    assert weight.dtype == dtype and bias.dtype == dtype
    assert torch.equal(weight, weight64.to(dtype)) and torch.equal(bias, bias64.to(dtype))


def test_fold_extreme_variances_match_a_float64_fold():
    """1/sqrt(1e-30) = 1e15 times a weight below 1 fits float32, but not if it were computed there:
    the fold must equal the formula of docs/design.md evaluated in float64 and rounded once."""
    conv = nn.Conv2d(4, 4, 1)
    bn = _bn("batchnorm", 4, 0.0)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-30, 1e-12, 1e30, 1.0]))
    weight, bias = fr.fold_bn(conv, bn)
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    expected_weight = conv.weight.double() * scale[:, None, None, None]
    expected_bias = bn.bias.double() + (conv.bias.double() - bn.running_mean.double()) * scale
    assert weight.isfinite().all() and bias.isfinite().all()
    # one rounding to float32 apart at most (the two float64 evaluations may order operations differently)
    ulp = torch.finfo(torch.float32).eps
    torch.testing.assert_close(weight, expected_weight.float(), rtol=ulp, atol=0)
    torch.testing.assert_close(bias, expected_bias.float(), rtol=ulp, atol=0)


def test_fold_leaves_modules_untouched():
    conv, bn = nn.Conv2d(3, 5, 3), _bn("batchnorm", 5, 1e-5)
    before = {k: v.clone() for k, v in {**conv.state_dict(), **{"bn." + k: v for k, v in bn.state_dict().items()}}.items()}
    fr.fold_bn(conv, bn)
    after = {**conv.state_dict(), **{"bn." + k: v for k, v in bn.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fold_refuses_training_mode():
    with pytest.raises(ValueError, match="training mode.*eval"):
        fr.fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).train())


def test_fold_refuses_bn_without_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fr.fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False).eval())


def test_fold_refuses_mismatched_channels():
    with pytest.raises(ValueError, match="4 output channels.*5 features"):
        fr.fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5).eval())


def test_fold_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        fr.fold_bn(nn.Linear(3, 4), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="BatchNorm"):
        fr.fold_bn(nn.Conv2d(3, 4, 1), nn.LayerNorm(4))


def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


@pytest.mark.parametrize("extension", [True, False], ids=["cpu-extension", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_is_torchs_float64_fold_bit_for_bit(extension, dtype, affine, monkeypatch, generator):
    """Whether the CPU extension scales the weight in one pass or ATen in three, the folded weight and bias
    are exactly torch.nn.utils.fusion.fuse_conv_bn_weights on float64 copies, cast once: every bit, NaN,
    infinities, denormals and -0.0 included, in the conv weight's memory format."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    from fused_resnet import cpu_extension

    if extension:
        cpu_extension_ops()
    else:
        monkeypatch.setattr(cpu_extension, "ops", lambda: None)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        conv = nn.Conv2d(12, 24, 3, bias=affine)
        bn = randomize_bn_(nn.BatchNorm2d(24, affine=affine), generator).eval()
        with torch.no_grad():
            conv.weight.view(-1)[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-42, -0.0, 3e38, -1e-45])
        conv = conv.to(memory_format=memory_format)

        def f64(t):
            return None if t is None else t.detach().double()

        expected = fuse_conv_bn_weights(
            f64(conv.weight), f64(conv.bias), f64(bn.running_mean), f64(bn.running_var), bn.eps, f64(bn.weight), f64(bn.bias)
        )
        for ours, theirs in zip(fr.fold_bn(conv, bn, dtype=dtype), expected):
            theirs = theirs.detach().to(dtype)
            assert ours.dtype == dtype and ours.stride() == theirs.stride()
            assert _bits(ours) == _bits(theirs)


def test_the_cpu_extensions_fold_refuses_what_it_does_not_scale():
    ops = cpu_extension_ops()
    weight, scale = torch.randn(4, 3, 3, 3), torch.rand(4, dtype=torch.float64)
    assert torch.equal(ops.scale_output_channels(weight, scale), (weight.double() * scale[:, None, None, None]).float())
    channels_last = weight.to(memory_format=torch.channels_last)  # each channel's weights still one block
    scaled = ops.scale_output_channels(channels_last, scale)
    assert scaled.stride() == channels_last.stride() and torch.equal(scaled, (weight.double() * scale[:, None, None, None]).float())
    with pytest.raises(RuntimeError, match="dense float32 weight"):
        ops.scale_output_channels(weight.double(), scale)
    with pytest.raises(RuntimeError, match="dense float32 weight"):
        ops.scale_output_channels(weight.transpose(0, 1), scale[:3])  # output channels interleaved
    with pytest.raises(RuntimeError, match="dense float32 weight"):
        ops.scale_output_channels(weight[:, :, ::2], scale)
    with pytest.raises(RuntimeError, match="one per output channel"):
        ops.scale_output_channels(weight, scale[:3])
    with pytest.raises(RuntimeError, match="one per output channel"):
        ops.scale_output_channels(weight, scale.float())
