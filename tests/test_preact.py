"""fused_resnet::conv2d_preact, the conv whose epilogue also writes the next block's BatchNorm + ReLU:

    y = conv2d(x, weight) + bias + residual,   z = relu(y * scale + shift)

against a float64 reference on every backend that runs here (torch, oneDNN, Triton under the
interpreter), and the graph pass that uses it for pre-activation ResNets (timm resnetv2_50).
"""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet as fr
from fused_resnet import backends, ops
from fused_resnet.call import ConvCall
from fused_resnet.architectures import build
from fused_resnet.export import export_program
from fused_resnet.fold import BN_TYPES, bn_scale_shift
from fused_resnet.fusion_report import batch_norm_ops
from fused_resnet.parity import parity, randomize_bn_
from helpers import eager_conv, reference_conv, run_on_onednn


# (N, C, H, W, Cout, kernel, stride, padding, groups)
CASES = [
    (2, 8, 9, 9, 16, 1, 1, 0, 1),  # 1x1, the conv3 of a bottleneck
    (1, 6, 7, 5, 10, 3, 1, 1, 1),  # batch 1, odd H and W, channels not a multiple of 8
    (2, 8, 8, 8, 12, 1, 2, 0, 1),  # 1x1 stride 2, a downsample
    (3, 4, 1, 1, 5, 1, 1, 0, 1),  # H = W = 1
    (2, 16, 6, 6, 16, 3, 1, 1, 4),  # grouped
]
BACKENDS = ["torch", "onednn", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def _make(case, dtype, layout="nchw", bias=True, residual=True, seed=0):
    n, c, h, w, cout, k, stride, padding, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    r = torch.randn(n, cout, oh, ow, generator=g).to(dtype) if residual else None
    scale = (torch.rand(cout, generator=g) + 0.5).to(dtype)
    shift = (torch.rand(cout, generator=g) - 0.5).to(dtype)
    return x, weight, b, r, scale, shift, (stride, stride), (padding, padding), groups


def _skip_unavailable(backend):
    reason = backends.get(backend).unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _check(backend, args, served_by, request=None):
    """With `request`, a dtype oneDNN lacks here checks the backend's refusal (helpers.run_on_onednn)."""
    x, weight, b, r, scale, shift, stride, padding, groups = args

    def call():
        return ops.conv2d_preact(x, weight, b, r, scale=scale, shift=shift, stride=stride, padding=padding,
                                 groups=groups, backend=backend)

    if backend == "onednn" and request is not None:
        y, z = run_on_onednn(call, x.dtype, request, served_by(backend))
    else:
        with served_by(backend):
            y, z = call()
    exact = reference_conv(x, weight, b, r, stride, padding, 1, groups, scale=scale, shift=shift)
    eager = eager_conv(x, weight, b, r, stride, padding, 1, groups, scale=scale, shift=shift, dtype=x.dtype)
    for out, eager_out, ref in zip((y, z), eager, exact):
        assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
        result = parity(out, eager_out, ref)  # NaN (an element never written) never passes
        assert result.ok, result
    return y, z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_reference_on_poisoned_outputs(poisoned_outputs, backend, dtype, case, monkeypatch, served_by, request):
    _skip_unavailable(backend)
    _check(backend, _make(case, dtype), served_by, request)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("bias, residual", [(True, True), (False, True), (True, False), (False, False)])
def test_layouts_and_optional_bias_and_residual(poisoned_outputs, backend, layout, bias, residual, monkeypatch, served_by):
    _skip_unavailable(backend)
    _check(backend, _make(CASES[1], torch.float32, layout, bias, residual), served_by)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_y_stays_nan_in_z(backend):
    """torch.relu keeps NaN; so must the pre-activation (oneDNN's ReLU post-op would not)."""
    _skip_unavailable(backend)
    x, weight, b, r, scale, shift, stride, padding, groups = _make(CASES[0], torch.float32)
    r[0, 3, 2, 2] = float("nan")
    y, z = ops.conv2d_preact(x, weight, b, r, scale=scale, shift=shift, backend=backend)
    assert torch.isnan(y[0, 3, 2, 2]) and torch.isnan(z[0, 3, 2, 2])
    assert torch.isnan(z).sum() == 1


def test_triton_kernel_writes_every_element_of_both_outputs():
    """The kernel alone, on NaN-filled outputs: tiles cross the edges of M and Cout (65 channels)."""
    _skip_unavailable("triton")
    from fused_resnet.backends.triton import conv

    x, weight, b, r, scale, shift, stride, padding, groups = _make((2, 8, 9, 7, 65, 3, 1, 1, 1), torch.float32)
    y, z = (torch.full((2, 65, 9, 7), float("nan")).contiguous(memory_format=torch.channels_last) for _ in "yz")
    conv.conv2d_preact(y, z, x, weight, b, r, scale, shift, stride, padding, (1, 1), groups)
    ref_y, ref_z = reference_conv(x, weight, b, r, stride, padding, 1, groups, scale=scale, shift=shift)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), ref_z, rtol=1e-5, atol=1e-5)


def test_opcheck_and_gradients():
    x, weight, b, r, scale, shift, stride, padding, groups = _make(CASES[1], torch.float64)
    args = (x, weight, b, r, scale, shift, list(stride), list(padding), [1, 1], groups, "torch")
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_preact.default, args)
    leaves = [t.requires_grad_() for t in (x, weight, b, r, scale, shift)]

    def both(x, weight, b, r, scale, shift):
        return ops.conv2d_preact(x, weight, b, r, scale=scale, shift=shift, padding=padding, backend="torch")

    assert torch.autograd.gradcheck(both, leaves)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(scale=torch.ones(3)), ValueError, "scale must have shape (10,)"),
        (dict(shift=torch.ones(10, dtype=torch.float64)), TypeError, "shift has dtype torch.float64"),
        (dict(scale=[1.0] * 10), TypeError, "scale must be a torch.Tensor"),
        (dict(residual=torch.ones(1, 10, 3, 3)), ValueError, "residual must have the output's shape"),
    ],
)
def test_bad_arguments_are_named(change, error, message):
    x, weight, b, r, scale, shift, stride, padding, groups = _make(CASES[1], torch.float32)
    kwargs = dict(residual=r, scale=scale, shift=shift, padding=padding, backend="torch") | change
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.conv2d_preact(x, weight, b, **kwargs)


class PreActBlock(nn.Module):
    """A pre-activation block written as people write it: BatchNorm, then a ReLU function."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        out = F.relu(self.bn(x))
        out = self.conv2(F.relu(self.bn1(self.conv1(out))))
        return out + x


class PreActNet(nn.Module):
    def __init__(self, channels=12, blocks=3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(PreActBlock(channels) for _ in range(blocks)))
        self.final_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.final_bn(self.blocks(self.stem(x)))).mean((2, 3))


def test_bn_then_relu_function_across_blocks_is_fused():
    model = randomize_bn_(PreActNet().eval(), torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 9, 11)
    states = copy.deepcopy(model.state_dict())
    fused = fr.fuse(model, backend="torch")
    # blocks.0.bn follows the stem conv, which no add follows; the final BN + relu function: an owner
    # that is the model itself, rewritten whole.
    assert batch_norm_ops(model, x) == 7 and batch_norm_ops(fused, x) == 1
    assert sum(isinstance(m, fr.FusedConv2dPreact) for m in fused.modules()) == 3
    with torch.no_grad():
        result = parity(fused(x), model(x), copy.deepcopy(model).double()(x.double()))
    assert result.ok, result
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in states.items())


@pytest.fixture(scope="module")
def resnetv2():
    return build("timm:resnetv2_50", torch.Generator().manual_seed(0))


def test_resnetv2_keeps_its_class_and_fuses_16_of_17_preactivations(resnetv2):
    fused = fr.fuse(resnetv2, backend="torch")
    assert type(fused) is type(resnetv2) and isinstance(fused.norm, nn.Identity)
    assert sum(isinstance(m, fr.FusedConv2dPreact) for m in fused.modules()) == 16
    assert [n for n, m in fused.named_modules() if isinstance(m, BN_TYPES)] == ["stages.0.blocks.0.norm1"]
    report = str(fr.inspect(resnetv2))
    assert "BatchNorm modules 49 -> 1" in report
    assert "and norm of it, two outputs" in report
    assert "stages.0.blocks.0.norm1            bn: it follows MaxPool2d" in report


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnetv2_parity_on_onednn(resnetv2, dtype, served_by, request):
    if backends.get("onednn").unavailable_reason(torch.device("cpu")):
        pytest.skip("no oneDNN")
    model = copy.deepcopy(resnetv2).to(dtype)
    fused = fr.fuse(model, backend="onednn")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = run_on_onednn(lambda: fused(x.to(dtype)), dtype, request, served_by("onednn"))
        assert batch_norm_ops(fused, x.to(dtype)) == 1
    with torch.no_grad():
        result = parity(out, model(x.to(dtype)), copy.deepcopy(resnetv2).double()(x.double()))
    assert result.ok, result


def test_bn_scale_shift_is_the_eval_batch_norm():
    bn = randomize_bn_(nn.BatchNorm2d(5).eval(), torch.Generator().manual_seed(4))
    scale, shift = bn_scale_shift(bn, dtype=torch.float64)
    y = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(y * scale[:, None, None] + shift[:, None, None], copy.deepcopy(bn).double()(y))
    with pytest.raises(ValueError, match="training mode"):
        bn_scale_shift(bn.train(), dtype=torch.float32)


def test_export_compile_and_onnx(tmp_path):
    model = randomize_bn_(PreActNet().eval(), torch.Generator().manual_seed(5))
    fused = fr.fuse(model, backend="torch")
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = fused(x)
        torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), expected)
        kept = export_program(fused, x)
        assert "fused_resnet.conv2d_preact.default" in {str(n.target) for n in kept.graph.nodes}
        torch.testing.assert_close(kept.module()(x), expected)
        lowered = export_program(fused, x, lower_to="aten")
        assert not any("fused_resnet" in str(n.target) for n in lowered.graph.nodes)
        torch.testing.assert_close(lowered.module()(torch.cat([x, x])), torch.cat([expected, expected]))
    onnx = pytest.importorskip("onnx")
    path = fr.export_onnx(fused, x, tmp_path / "preact.onnx")
    ops_used = [node.op_type for node in onnx.load(path).graph.node]
    # The one BatchNorm left: blocks.0.bn reads the stem conv's output, which the add reads too.
    assert set(ops_used) <= {"Conv", "Add", "Mul", "Relu", "ReduceMean", "BatchNormalization"}, ops_used
    assert ops_used.count("BatchNormalization") == 1 and ops_used.count("Conv") == 7


def test_export_lowered_to_triton_kernels(poisoned_outputs, monkeypatch):
    _skip_unavailable("triton")
    model = randomize_bn_(PreActNet().eval(), torch.Generator().manual_seed(6))
    fused = fr.fuse(model, backend="torch")
    x = torch.randn(2, 3, 9, 11)
    program = export_program(fused, x, lower_to="triton")
    assert "fused_resnet_triton.conv2d_preact.default" in {str(n.target) for n in program.graph.nodes}
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fused(x), rtol=1e-5, atol=1e-5)


def test_verified_backend_checks_both_outputs_on_the_first_call(served_by):
    _skip_unavailable("onednn")
    args = _make(CASES[1], torch.float32)
    x, weight, b, r, scale, shift, stride, padding, groups = args
    with served_by("onednn") as served:
        for _ in range(2):
            y, z = ops.conv2d_preact(x, weight, b, r, scale=scale, shift=shift, padding=padding,
                                     backend=backends.verified("onednn"))
    assert served == ["onednn", "onednn"]
    exact = reference_conv(x, weight, b, r, stride, padding, 1, groups, scale=scale, shift=shift)
    torch.testing.assert_close((y.double(), z.double()), exact, rtol=1e-5, atol=1e-5)


def test_a_backend_without_the_second_output_falls_back_with_the_reason(fallback_allowed):
    """cuDNN does not serve conv2d_preact; a case Triton refuses (float64) shows the fallback path on the
    CPU: the reference computes it, and a warning says why."""
    assert "second" in backends.get("cudnn").preact_unsupported_reason(ConvCall.of(None, None))
    _skip_unavailable("triton")
    x, weight, b, r, scale, shift, stride, padding, groups = _make(CASES[1], torch.float64)
    with pytest.warns(UserWarning, match="does not support this convolution with a pre-activation output .float64"):
        y, z = ops.conv2d_preact(x, weight, b, r, scale=scale, shift=shift, padding=padding, backend="triton")
    exact = reference_conv(x, weight, b, r, stride, padding, 1, groups, scale=scale, shift=shift)
    torch.testing.assert_close((y, z), exact)


def test_cuda_backend_serves_the_second_output_on_every_kernel():
    """The extension's kernel rule, from sizes alone: a resnetv2 1x1 conv with a residual gets a Hopper
    kernel on compute capability 9.0 and a CUTLASS 2.x one on 8.0; both write the second output."""
    cuda = backends.get("cuda")
    if cuda._C is None or not cuda.CONV_CONFIGS:
        pytest.skip(f"the CUDA extension is not built with its conv kernels: {cuda._LOAD_ERROR}")
    args = (torch.bfloat16, [8, 256, 56, 56], [64, 256, 1, 1], [1, 1], [0, 0], [1, 1], True)
    ampere = torch.ops.fused_resnet_C.conv2d_kernel(*args, [8, 0], 108)[0]
    assert not ampere.startswith("sm90_")
    x, weight = torch.empty(args[1], dtype=args[0]), torch.empty(args[2], dtype=args[0])
    for gpu in ((8, 0, 108), (9, 0, 132)):
        with mock.patch.object(cuda, "_gpu", return_value=gpu):
            assert cuda.preact_unsupported_reason(ConvCall.of(x, weight, None, x, *args[3:6], 1)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        (4, 64, 14, 14, 256, 1, 1, 0, 1),  # resnetv2 1x1: a Hopper kernel on compute capability 9.0
        (4, 24, 14, 14, 40, 3, 1, 1, 1),  # 24 channels: a CUTLASS 2.x kernel on any GPU; 40 crosses a tile
        (2, 3, 17, 17, 16, 3, 2, 1, 1),  # the few-channels kernel
    ],
    ids=str,
)
def test_gpu_kernels_write_both_outputs(poisoned_outputs, backend, dtype, residual, case, monkeypatch, served_by):
    """On a GPU, on poisoned outputs: layers for each kind of C++ kernel."""
    if backend == "cuda":
        reason = backends.get("cuda").unavailable_reason(torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
    args = _make(case, dtype, "channels_last", residual=residual)
    _check(backend, tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in args), served_by)
