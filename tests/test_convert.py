"""fr.fuse on every supported torchvision ResNet: parity with eager, layouts, gradients, no mutation."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, ResNet

import fused_resnet as fr
from fused_resnet.architectures import ARCHITECTURES, REPRESENTATIVE, build
from fused_resnet.parity import parity, randomize_bn_


def _parity_fp32(eager: nn.Module, fused: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        ref = copy.deepcopy(eager).double()(x.double())
        return parity(fused(x), eager(x), ref)


@pytest.mark.parametrize(
    "arch", [arch if arch in REPRESENTATIVE else pytest.param(arch, marks=pytest.mark.slow) for arch in ARCHITECTURES]
)
def test_every_architecture_matches_eager(arch):
    model = build(arch, torch.Generator().manual_seed(1))
    fused = fr.fuse(model, backend="torch")
    assert isinstance(fused, fr.FusedResNet)
    result = _parity_fp32(model, fused, torch.randn(2, 3, 64, 64))
    assert result.ok, result


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 57, 45), (1, 3, 33, 31), (3, 3, 1, 1)])
def test_layouts_batch_one_and_odd_sizes(layout, shape):
    model = build("resnet18", torch.Generator().manual_seed(2))
    fused = fr.fuse(model)
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    result = _parity_fp32(model, fused, x)
    assert result.ok, result


def test_input_model_is_not_mutated():
    model = build("resnet50", torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(name, type(m), m.training) for name, m in model.named_modules()]
    fr.fuse(model, dtype=torch.float64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [(name, type(m), m.training) for name, m in model.named_modules()] == modules_before


def test_dtype_argument_casts_the_fused_model():
    model = build("resnet18", torch.Generator().manual_seed(4))
    fused = fr.fuse(model, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), copy.deepcopy(model).double()(x.double()), rtol=1e-10, atol=1e-10)


def test_backbone_without_head_is_fused_block_by_block():
    model = build("resnet50", torch.Generator().manual_seed(5))
    backbone = nn.Sequential(*list(model.children())[:-2])
    fused = fr.fuse(backbone)
    assert sum(isinstance(m, fr.FusedBottleneck) for m in fused.modules()) == 16
    result = _parity_fp32(backbone, fused, torch.randn(2, 3, 48, 48))
    assert result.ok, result


def test_dilated_segmentation_backbone():
    model = build("resnet50_dilated", torch.Generator().manual_seed(6))
    backbone = IntermediateLayerGetter(model, return_layers={"layer3": "aux", "layer4": "out"})
    fused = fr.fuse(backbone)
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        ref = copy.deepcopy(backbone).double()(x.double())
        eager, ours = backbone(x), fused(x)
    for key in ("aux", "out"):
        result = parity(ours[key], eager[key], ref[key])
        assert result.ok, (key, result)


def test_resnet_subclass_with_its_own_forward_keeps_it():
    class TwoHeads(ResNet):
        def forward(self, x):
            return super().forward(x), super().forward(x.flip(-1))

    model = randomize_bn_(TwoHeads(BasicBlock, [1, 1, 1, 1], num_classes=7).eval())
    fused = fr.fuse(model)
    assert type(fused) is TwoHeads
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for ours, eager in zip(fused(x), model(x)):
            torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)


def test_single_block_is_fused():
    block = randomize_bn_(BasicBlock(8, 8).eval())
    fused = fr.fuse(block)
    assert isinstance(fused, fr.FusedBasicBlock)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-5)


def test_model_with_nothing_to_fuse_warns_and_copies():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())
    with pytest.warns(UserWarning, match="nothing in Sequential could be fused"):
        fused = fr.fuse(model)
    assert fused is not model and fused[0].weight.data_ptr() != model[0].weight.data_ptr()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 2, 3, 32, 32)])
def test_wrong_rank_input_names_the_expected_shape(shape):
    fused = fr.fuse(build("resnet18"), backend="torch")
    expected = f"FusedResNet takes a 4-D batch of images (N, 3, H, W), got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        fused(torch.randn(shape))


def test_training_mode_model_is_refused():
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        fr.fuse(build("resnet18").train())


def test_train_mode_keeps_folded_statistics_and_warns_once(monkeypatch):
    monkeypatch.setattr(fr.nn, "_warned_train", False)
    model = build("resnet18", torch.Generator().manual_seed(7))
    fused = fr.fuse(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eval_out = fused(x)
    with pytest.warns(UserWarning, match="frozen BatchNorm"):
        fused.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.train()
        with torch.no_grad():
            assert torch.equal(fused(x), eval_out)


def test_gradients_match_eager():
    """Input gradients equal eager's; each fused weight's gradient, scaled back by the BN factor, equals the
    eager conv's (W' = W * s, so dL/dW = dL/dW' * s); each fused bias's gradient equals dL/dbeta."""
    model = build("resnet18", torch.Generator().manual_seed(8)).double()
    fused = fr.fuse(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x_eager, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(2, 1000, dtype=torch.float64)
    model(x_eager).backward(grad_out)
    fused(x_fused).backward(grad_out)
    torch.testing.assert_close(x_fused.grad, x_eager.grad, rtol=1e-9, atol=1e-12)

    pairs = [(model.conv1, model.bn1, fused.conv1)]
    for layer in range(1, 5):
        for eager_block, fused_block in zip(getattr(model, f"layer{layer}"), getattr(fused, f"layer{layer}")):
            pairs += [(eager_block.conv1, eager_block.bn1, fused_block.conv1), (eager_block.conv2, eager_block.bn2, fused_block.conv2)]
            if eager_block.downsample is not None:
                pairs.append((eager_block.downsample[0], eager_block.downsample[1], fused_block.downsample))
    assert len(pairs) == 20
    for conv, bn, fused_conv in pairs:
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        torch.testing.assert_close(fused_conv.weight.grad * scale[:, None, None, None], conv.weight.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fused_conv.bias.grad, bn.bias.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fused.fc.weight.grad, model.fc.weight.grad, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trips_bit_for_bit(tmp_path):
    fused = fr.fuse(build("resnext50_32x4d", torch.Generator().manual_seed(9)), dtype=torch.float16)
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)
    fresh = fr.fuse(build("resnext50_32x4d", torch.Generator().manual_seed(10)), dtype=torch.float16)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    loaded, original = fresh.state_dict(), fused.state_dict()
    assert loaded.keys() == original.keys()
    bits = lambda t: t.detach().contiguous().view(torch.uint8)  # noqa: E731
    for key, value in original.items():
        assert value.dtype == loaded[key].dtype and torch.equal(bits(value), bits(loaded[key])), key
