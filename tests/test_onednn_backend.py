"""The oneDNN CPU backend against the reference backend and a float64 reference, on every conv shape
class of the torchvision ResNets; its prepacked-weight cache; and what it must leave untouched
(state_dict, export). Every numeric test checks that oneDNN computed the call, not a fallback."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

import fused_resnet as fr
from fused_resnet import backends, dispatch, ops
from fused_resnet.call import ConvCall
from fused_resnet.architectures import build
from fused_resnet.export import export_program
from fused_resnet.parity import parity, relative_error, top1_agreement
from helpers import eager_conv, onednn_reason, reference_conv, run_on_onednn

pytestmark = pytest.mark.skipif(
    backends.get("onednn").unavailable_reason(torch.device("cpu")) is not None, reason="PyTorch built without oneDNN"
)
onednn = backends.get("onednn")
# bfloat16 where oneDNN has it; elsewhere the bfloat16 cases check the backend's refusal (helpers.run_on_onednn).
DTYPES = [torch.float32, torch.bfloat16]


# (C, H, W, Cout, kernel, stride, padding, dilation, groups): each kind of conv in the ten ResNets,
# at small sizes, with odd maps and channel counts that are not multiples of 8 where the kind allows.
SHAPE_CLASSES = {
    "stem 7x7/2, 3 channels": (3, 15, 13, 8, 7, 2, 3, 1, 1),
    "1x1": (12, 7, 9, 20, 1, 1, 0, 1, 1),
    "1x1/2 downsample": (8, 9, 9, 16, 1, 2, 0, 1, 1),
    "3x3": (6, 7, 5, 10, 3, 1, 1, 1, 1),
    "3x3/2": (16, 9, 8, 16, 3, 2, 1, 1, 1),
    "3x3 grouped (resnext)": (16, 6, 7, 16, 3, 1, 1, 1, 4),
    "3x3/2 grouped": (24, 9, 9, 24, 3, 2, 1, 1, 8),
    "3x3 dilated 2": (8, 9, 9, 8, 3, 1, 2, 2, 1),
    "3x3 dilated 4": (8, 11, 10, 8, 3, 1, 4, 4, 1),
    "3x3 on a 1x1 map": (4, 1, 1, 4, 3, 1, 1, 1, 1),
}


def make(shape_class, batch, dtype, memory_format, residual, generator):
    c, h, w, cout, k, stride, padding, dilation, groups = SHAPE_CLASSES[shape_class]
    x = torch.randn(batch, c, h, w, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    weight = (torch.randn(cout, c // groups, k, k, generator=generator) * (c // groups * k * k) ** -0.5).to(dtype)
    bias = torch.randn(cout, generator=generator).to(dtype)
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = torch.randn(batch, cout, oh, ow, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, bias, r if residual else None, conv


@contextlib.contextmanager
def served_by_onednn(expected_calls=1):
    """Fails when the calls inside did not all run on oneDNN (a fallback would warn or skip the counter)."""
    with warnings.catch_warnings(), dispatch.record_serving() as served:
        warnings.simplefilter("error")
        yield
    assert served.count("onednn") == expected_calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)], ids=["relu", "res+relu", "res", "plain"])
@pytest.mark.parametrize("shape_class", SHAPE_CLASSES)
def test_matches_reference_and_float64(shape_class, residual, relu, memory_format, batch, dtype, generator, request):
    x, weight, bias, r, conv = make(shape_class, batch, dtype, memory_format, residual, generator)
    out = run_on_onednn(
        lambda: ops.conv2d_bias_act(x, weight, bias, r, relu=relu, backend="onednn", **conv), dtype, request, served_by_onednn()
    )
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    reference = ops.conv2d_bias_act(x, weight, bias, r, relu=relu, backend="torch", **conv)
    eager = eager_conv(x, weight, bias, r, dtype=dtype, relu=relu, **conv)
    exact = reference_conv(x, weight, bias, r, relu=relu, **conv)
    result = parity(out, eager, exact)
    assert result.ok, str(result)
    assert parity(out, reference, exact).ok


def test_auto_picks_onednn_on_the_cpu(generator):
    x, weight, bias, r, conv = make("3x3", 2, torch.float32, torch.channels_last, True, generator)
    with served_by_onednn():
        ops.conv2d_bias_act(x, weight, bias, r, backend="auto", **conv)
    assert dispatch.select(dispatch.CONV, "auto", ConvCall.of(x, weight, bias, r, 1, 1, 1, 1)) is onednn


def test_empty_batch_never_reaches_the_backend(generator):
    x, weight, bias, r, conv = make("3x3/2", 0, torch.float32, torch.channels_last, True, generator)
    with served_by_onednn(expected_calls=0):
        out = ops.conv2d_bias_act(x, weight, bias, r, backend="onednn", **conv)
    assert out.shape == (0, 16, 5, 4)


@pytest.mark.parametrize("shape_class", ["3x3 on a 1x1 map", "1x1/2 downsample", "stem 7x7/2, 3 channels"])
def test_poisoned_outputs_are_fully_written(poisoned_outputs, shape_class, monkeypatch, generator):
    x, weight, bias, r, conv = make(shape_class, 1, torch.float32, torch.contiguous_format, True, generator)
    with served_by_onednn():
        out = ops.conv2d_bias_act(x, weight, bias, r, backend="onednn", **conv)
    assert not out.isnan().any()


def test_strided_bias_and_weight_views(generator):
    """oneDNN reads the bias as dense memory: a strided view must be made dense first."""
    x, weight, bias, r, conv = make("3x3", 2, torch.float32, torch.channels_last, True, generator)
    wide_bias = torch.stack([bias, -bias], 1).reshape(-1)
    tall_weight = torch.cat([weight, weight.neg()], 1)[:, : weight.shape[1]]
    with served_by_onednn():
        out = ops.conv2d_bias_act(x, tall_weight, wide_bias[::2], r, backend="onednn", **conv)
    torch.testing.assert_close(out, ops.conv2d_bias_act(x, weight, bias, r, backend="torch", **conv))


def test_unsupported_dtype_falls_back_with_the_reason(generator, fallback_allowed):
    x, weight, bias, r, conv = make("3x3", 2, torch.float64, torch.channels_last, True, generator)
    with pytest.warns(UserWarning, match="backend 'onednn' does not support this convolution .*float64"):
        out = ops.conv2d_bias_act(x, weight, bias, r, backend="onednn", **conv)
    torch.testing.assert_close(out, reference_conv(x, weight, bias, r, relu=True, **conv))


def fused_conv(generator, dtype=torch.float32):
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(8)
    for t in (conv.weight, bn.running_mean, bn.weight, bn.bias):
        t.data.copy_(torch.randn(t.shape, generator=generator))
    bn.running_var.data.uniform_(0.5, 2.0, generator=generator)
    return fr.FusedConv2d.from_conv_bn(conv, bn.eval(), relu=True, backend="onednn", dtype=dtype)


def expected(module, x):
    return ops.conv2d_bias_act(
        x, module.weight, module.bias, padding=module.padding, relu=module.relu, backend="torch"
    )


@torch.no_grad()
def test_cache_follows_in_place_edits_and_load_state_dict(generator):
    module = fused_conv(generator)
    x = torch.randn(2, 8, 6, 6, generator=generator)
    with served_by_onednn(3):
        module(x)
        module.weight.mul_(-1)
        torch.testing.assert_close(module(x), expected(module, x))
        other = fused_conv(torch.Generator().manual_seed(1))
        module.load_state_dict(other.state_dict())
        torch.testing.assert_close(module(x), expected(other, x))


@torch.no_grad()
def test_cache_follows_to_dtype(generator, request):
    module = fused_conv(generator)
    x = torch.randn(2, 8, 6, 6, generator=generator)
    with served_by_onednn():
        module(x)
    module.to(torch.bfloat16)
    out = run_on_onednn(lambda: module(x.bfloat16()), torch.bfloat16, request, served_by_onednn())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected(module, x.bfloat16()))


@torch.no_grad()
def test_one_packed_weight_per_input_shape_and_bounded(generator):
    module = fused_conv(generator)
    for size in range(4, 4 + onednn.MAX_SHAPES_PER_WEIGHT + 2):
        x = torch.randn(1, 8, size, size, generator=generator)
        torch.testing.assert_close(module(x), expected(module, x))
    packed = onednn._packed.copies(module.weight)
    assert len(packed) == onednn.MAX_SHAPES_PER_WEIGHT
    assert all(p.is_mkldnn for p in packed.values())


def test_inference_mode_weights_are_read_unpacked(generator):
    with torch.inference_mode():
        module = fused_conv(generator)
        x = torch.randn(2, 8, 6, 6, generator=generator)
        with served_by_onednn():
            out = module(x)
        torch.testing.assert_close(out, expected(module, x))
    assert not onednn._packed.copies(module.weight)


def test_state_dict_and_saved_weights_hold_no_packed_weight(generator, tmp_path):
    module = fused_conv(generator)
    with torch.no_grad(), served_by_onednn():
        module(torch.randn(1, 8, 6, 6, generator=generator))
    state = module.state_dict()
    assert set(state) == {"weight", "bias"} and not any(t.is_mkldnn for t in state.values())
    torch.save(state, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_gradients_match_the_reference_backend(generator):
    x, weight, bias, r, conv = make("3x3/2", 2, torch.float32, torch.channels_last, True, generator)
    grads = {}
    for name in ("onednn", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, r)]
        ops.conv2d_bias_act(*leaves, backend=name, **conv).square().sum().backward()
        grads[name] = [t.grad for t in leaves]
    for ours, theirs in zip(*grads.values()):
        torch.testing.assert_close(ours, theirs)


def test_opcheck(generator):
    x, weight, bias, r, conv = make("3x3/2", 2, torch.float32, torch.channels_last, True, generator)
    args = (x, weight, bias, r, [2, 2], [1, 1], [1, 1], 1, True, "onednn")
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act.default, args)


@pytest.mark.filterwarnings("ignore:No complete tensor found")
def test_export_and_onnx_hold_plain_weights_only(generator, tmp_path):
    block = BasicBlock(8, 8).eval()
    fr.parity.randomize_bn_(block, generator)
    fused = fr.fuse(block, backend="onednn")
    x = torch.randn(2, 8, 7, 7, generator=generator)
    with torch.no_grad(), served_by_onednn(2):
        out = fused(x)
    program = export_program(fused, x, lower_to="aten")
    tensors = [*program.state_dict.values(), *program.constants.values()]
    assert tensors and not any(t.is_mkldnn for t in tensors if isinstance(t, torch.Tensor))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), out)
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(fr.export_onnx(fused, x, tmp_path / "block.onnx")))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), out.contiguous(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_model_parity(arch, dtype, served_by):
    model = build(arch, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fused = fr.fuse(model, dtype=dtype)
    # backend="auto" takes oneDNN where it serves the dtype, else the reference, without a warning.
    serving = served_by_onednn(20 if arch == "resnet18" else 53) if onednn_reason(dtype) is None else served_by("torch")
    with torch.no_grad(), serving:
        out = fused(x)
    with torch.no_grad():
        eager = model.to(dtype)(x.to(dtype))
        exact = model.double()(x.double())
        fp32 = model.float()(x)
    result = parity(out, eager, exact)
    assert result.ok, str(result)
    print(f"{arch} {result}; top-1 agreement with fp32 eager {top1_agreement(out, fp32):.2f}")


@pytest.mark.parametrize("backend", ["onednn", "torch"])
@pytest.mark.parametrize("view", ["channels_last", "sliced"])
def test_dilation_on_a_one_wide_kernel_axis_and_strided_views(backend, view, generator, served_by, request):
    """bfloat16, channels_last, a 1-wide kernel axis with dilation 2, stride 2 and padding on a 1-wide
    input: eager F.conv2d crashes the process on this shape (oneDNN); the op computes it (the dilation of
    a size-1 axis changes nothing), also from a view with gaps, and matches float64."""
    x = torch.randn(2, 3, 2, 1, generator=generator).to(torch.bfloat16)
    if view == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        big = torch.zeros(2, 5, 4, 3, dtype=torch.bfloat16)
        big[:, 1:4, ::2, ::3] = x
        x = big[:, 1:4, ::2, ::3]
    weight = torch.randn(4, 3, 2, 1, generator=generator).to(torch.bfloat16)
    residual = torch.randn(2, 4, 2, 2, generator=generator).to(torch.bfloat16).transpose(2, 3).contiguous().transpose(2, 3)
    conv = dict(stride=(1, 2), padding=(1, 1), dilation=(2, 2))
    def call():
        return ops.conv2d_bias_act(x, weight, None, residual, backend=backend, **conv)

    if backend == "onednn":
        out = run_on_onednn(call, torch.bfloat16, request, served_by(backend))
    else:
        with served_by(backend):
            out = call()
    exact = (F.conv2d(x.double(), weight.double(), None, **conv) + residual.double()).relu()
    assert relative_error(out, exact) <= 2e-2  # bfloat16 rounding of inputs and output: ~1e-2 at most
