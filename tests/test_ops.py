"""The torch.library ops with the reference backend: plumbing, layouts, autograd, opcheck, errors.

The reference backend computes with eager PyTorch's own ops, so its numbers are PyTorch's: these
tests check what our code does around them (arguments, epilogue, output layout), once per case.
"""

import itertools
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet as fr
from fused_resnet import backends, dispatch, ops
from helpers import reference_conv


def assert_close_fp32(out, ref):
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# (N, C, H, W, Cout, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 8, 9, 9, 16, 1, 1, 0, 1, 1),  # 1x1
    (2, 8, 9, 9, 16, 1, 2, 0, 1, 1),  # 1x1 stride 2 (downsample)
    (1, 6, 7, 5, 10, 3, 1, 1, 1, 1),  # batch 1, odd H and W, channels not a multiple of 8
    (2, 8, 8, 8, 8, 3, 2, 1, 1, 1),  # 3x3 stride 2
    (1, 3, 15, 13, 8, 7, 2, 3, 1, 1),  # stem: C = 3, 7x7 stride 2
    (2, 16, 6, 6, 16, 3, 1, 1, 1, 4),  # grouped
    (2, 8, 5, 5, 8, 3, 1, 1, 1, 8),  # depthwise
    (1, 8, 9, 9, 8, 3, 1, 2, 2, 1),  # dilated
    (3, 4, 1, 1, 5, 1, 1, 0, 1, 1),  # H = W = 1
    (1, 4, 1, 1, 4, 3, 1, 1, 1, 1),  # 3x3 on a 1x1 map
]


def _make(case, dtype=torch.float32, layout="nchw", residual=True, bias=True, requires_grad=False):
    n, c, h, w, cout, k, stride, padding, dilation, groups = case
    x = torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view
        x = torch.randn(n, c, 2 * h, w + 3, dtype=dtype)[:, :, ::2, 1 : w + 1]
    weight = torch.randn(cout, c // groups, k, k, dtype=dtype) / (c // groups * k * k) ** 0.5
    b = torch.randn(cout, dtype=dtype) if bias else None
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = torch.randn(n, cout, oh, ow, dtype=dtype) if residual else None
    for t in (x, weight, b, r):
        if t is not None and requires_grad:
            t.requires_grad_(True)
    return x, weight, b, r, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


# Each conv case once, with the layouts and the epilogues taking turns across them.
LAYOUTS = ["nchw", "channels_last", "strided"]
EPILOGUES = [(False, True), (True, True), (True, False), (False, False)]  # (residual, relu)
PLUMBING_CASES = [
    pytest.param(case, layout, residual, relu, id=f"{i}-{layout}-{'res' if residual else 'nores'}-{'relu' if relu else 'norelu'}")
    for i, (case, layout, (residual, relu)) in enumerate(zip(CONV_CASES, itertools.cycle(LAYOUTS), itertools.cycle(EPILOGUES)))
]


@pytest.mark.parametrize("case, layout, residual, relu", PLUMBING_CASES)
def test_conv2d_bias_act_reference_matches_float64(case, layout, residual, relu):
    x, weight, bias, res, kw = _make(case, layout=layout, residual=residual)
    out = ops.conv2d_bias_act(x, weight, bias, res, relu=relu, backend="torch", **kw)
    ref = reference_conv(x, weight, bias, res, relu=relu, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_fp32(out, ref)


def test_conv_without_bias():
    x, weight, _, _, kw = _make(CONV_CASES[2], bias=False, residual=False)
    out = ops.conv2d_bias_act(x, weight, backend="torch", **kw)
    assert_close_fp32(out, reference_conv(x, weight, None, None, relu=True, **kw))


def test_empty_batch():
    x = torch.randn(0, 4, 5, 5)
    out = ops.conv2d_bias_act(x, torch.randn(6, 4, 3, 3), padding=1, backend="auto")
    assert out.shape == (0, 6, 5, 5)


def test_auto_on_cpu_uses_an_available_backend():
    x, weight, bias, res, kw = _make(CONV_CASES[0])
    out = ops.conv2d_bias_act(x, weight, bias, res, **kw)
    assert_close_fp32(out, reference_conv(x, weight, bias, res, relu=True, **kw))
    assert "torch" in backends.available("cpu")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_add_relu(layout):
    x, y = torch.randn(2, 5, 7, 3), torch.randn(2, 5, 7, 3)
    if layout == "channels_last":
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
    out = ops.add_relu(x, y, backend="torch")
    assert torch.equal(out, (x + y).relu())
    assert out.stride() == x.stride()


def test_poisoned_outputs_are_fully_written(poisoned_outputs, monkeypatch):
    for case in CONV_CASES:
        x, weight, bias, res, kw = _make(case)
        assert not ops.conv2d_bias_act(x, weight, bias, res, backend="torch", **kw).isnan().any()
    assert not ops.add_relu(torch.randn(3, 4), torch.randn(3, 4), backend="torch").isnan().any()


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[5], CONV_CASES[7]])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_gradients(case, relu):
    x, weight, bias, res, kw = _make(case, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b, r: ops.conv2d_bias_act(x, w, b, r, relu=relu, backend="torch", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, res), fast_mode=True)


def test_add_relu_gradients():
    x, y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(
        2, 3, 4, 5, dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(lambda a, b: ops.add_relu(a, b, backend="torch"), (x, y), fast_mode=True)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[4], CONV_CASES[5], CONV_CASES[7]])
def test_opcheck_conv2d_bias_act(case):
    x, weight, bias, res, kw = _make(case, requires_grad=True)
    args = (x, weight, bias, res, [kw["stride"]] * 2, [kw["padding"]] * 2, [kw["dilation"]] * 2, kw["groups"], True, "torch")
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act.default, args)
    args_no_optional = (x, weight, None, None, *args[4:8], False, "torch")
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act.default, args_no_optional)


def test_opcheck_add_relu():
    x, y = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_resnet.add_relu.default, (x, y, "torch"))


def test_unknown_backend_is_rejected():
    x, weight, bias, res, kw = _make(CONV_CASES[0])
    with pytest.raises(ValueError, match="unknown backend 'cudnn9'; supported backends are 'cuda', 'triton', 'cudnn', 'onednn', 'torch' and 'auto'"):
        ops.conv2d_bias_act(x, weight, backend="cudnn9")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.add_relu(x, x, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        fr.FusedConv2d(3, 4, 1, backend="nope")


def test_strict_mode_refuses_the_fallback(monkeypatch):
    """FUSED_RESNET_STRICT=1 (the test suite's setting) turns the fallback into an error naming the reason."""
    monkeypatch.setattr(dispatch, "STRICT", True)
    triton = backends.get("triton")
    monkeypatch.setattr(triton, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton, "conv_unsupported_reason", lambda *args: "a made-up limitation")
    monkeypatch.setattr(triton, "add_relu_unsupported_reason", lambda x, y: "another made-up limitation")
    x, weight, bias, res, kw = _make(CONV_CASES[0])
    with pytest.raises(RuntimeError, match="'triton' does not support this convolution .a made-up limitation.*STRICT"):
        ops.conv2d_bias_act(x, weight, bias, res, backend="triton", **kw)
    with pytest.raises(RuntimeError, match="'triton' does not support this add_relu .another made-up.*STRICT"):
        ops.add_relu(x, x, backend="triton")


def test_a_refused_case_is_refused_on_every_call(monkeypatch):
    """The choice kept per layer is never a fallback: under STRICT each call of a case the named
    backend does not serve raises, the second as the first."""
    monkeypatch.setattr(dispatch, "STRICT", True)
    triton = backends.get("triton")
    monkeypatch.setattr(triton, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton, "conv_unsupported_reason", lambda *args: "a made-up limitation")
    x, weight, bias, res, kw = _make(CONV_CASES[0])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="a made-up limitation.*STRICT"):
            ops.conv2d_bias_act(x, weight, bias, res, backend="triton", **kw)


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    cuda = backends.get("cuda")
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: "the extension is not built")
    x, weight, *_ = _make(CONV_CASES[0])
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors: the extension is not built"):
        ops.conv2d_bias_act(x, weight, backend="cuda")


def test_unsupported_case_falls_back_to_reference_with_one_warning(monkeypatch, fallback_allowed):
    triton = backends.get("triton")
    monkeypatch.setattr(triton, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton, "conv_unsupported_reason", lambda *args: "a made-up limitation")
    x, weight, bias, res, kw = _make(CONV_CASES[0])
    with pytest.warns(UserWarning, match="'triton' does not support.*a made-up limitation.*reference"):
        with dispatch.record_serving() as served:
            out = ops.conv2d_bias_act(x, weight, bias, res, backend="triton", **kw)
    assert served == ["torch"]
    assert_close_fp32(out, reference_conv(x, weight, bias, res, relu=True, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.conv2d_bias_act(x, weight, bias, res, backend="triton", **kw)  # no second warning


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.randn(8, 9, 9)), ValueError, "x must be a 4-D"),
        (dict(weight=torch.randn(16, 8)), ValueError, "weight must be a 4-D"),
        (dict(x=torch.randn(2, 7, 9, 9)), ValueError, "x has 7 channels"),
        (dict(x=torch.randint(0, 5, (2, 8, 9, 9))), TypeError, "dtype torch.int64; supported dtypes are float16"),
        (dict(weight=torch.randn(16, 8, 1, 1, dtype=torch.float64)), TypeError, "weight has dtype torch.float64 but"),
        (dict(bias=torch.randn(15)), ValueError, r"bias must have shape \(16,\)"),
        (dict(residual=torch.randn(2, 16, 8, 9)), ValueError, r"residual must have the output's shape \(2, 16, 9, 9\)"),
        (dict(stride=0), ValueError, "stride must be a pair of positive ints"),
        (dict(dilation=(1, -1)), ValueError, "dilation must be a pair of positive ints"),
        (dict(padding=-1), ValueError, "padding must be a pair of non-negative ints"),
        (dict(padding="same"), TypeError, "padding must be an int or a pair of ints"),
        (dict(groups=3), ValueError, "x has 8 channels but weight"),
        (dict(groups=0), ValueError, "groups must be a positive int"),
        (dict(weight=torch.randn(16, 8, 11, 11)), ValueError, "larger than the padded input"),
        (dict(weight=torch.randn(16, 8, 3, 3), padding=(1, 0), dilation=(1, 5)), ValueError, "larger than the padded input"),
        # not tensors, or not the kind of value the schema takes
        (dict(x=None), TypeError, "x must be a torch.Tensor, got NoneType"),
        (dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor, got list"),
        (dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor, got list"),
        (dict(bias=[0.0] * 16), TypeError, "bias must be a torch.Tensor or None, got list"),
        (dict(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair of ints"),
        (dict(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
        (dict(dilation=(True, 1)), TypeError, "dilation must be an int or a pair of ints"),
        (dict(groups=1.0), TypeError, "groups must be an int, got 1.0"),
        (dict(relu="yes"), TypeError, "relu must be a bool"),
        (dict(backend=None), TypeError, "backend must be a str"),
        (dict(backend="cudnn9"), ValueError, "unknown backend 'cudnn9'"),
        # dtypes and layouts
        (dict(x=torch.zeros(2, 8, 9, 9, dtype=torch.bool)), TypeError, "x has dtype torch.bool; supported"),
        (dict(x=torch.randn(2, 8, 9, 9, dtype=torch.complex64)), TypeError, "x has dtype torch.complex64; supported"),
        (dict(bias=torch.arange(16)), TypeError, "bias has dtype torch.int64; supported"),
        (dict(residual=torch.randn(2, 16, 9, 9, dtype=torch.float16)), TypeError, "residual has dtype torch.float16 but"),
        (dict(x=torch.randn(2, 8, 9, 9).to_sparse()), TypeError, "x has layout torch.sparse_coo; only dense"),
        # devices (the meta device stands in for a second device)
        (dict(weight=torch.randn(16, 8, 1, 1, device="meta")), ValueError, "weight is on meta but the input x is on cpu"),
        (dict(bias=torch.randn(16, device="meta")), ValueError, "bias is on meta but the input x is on cpu"),
        (dict(residual=torch.randn(2, 16, 9, 9, device="meta")), ValueError, "residual is on meta but the input x is on"),
        # shapes
        (dict(x=torch.randn(2, 8, 9)), ValueError, "x must be a 4-D"),
        (dict(weight=torch.randn(16, 8, 1, 1, 1)), ValueError, "weight must be a 4-D"),
        (dict(weight=torch.randn(0, 8, 1, 1)), ValueError, r"weight of shape \(0, 8, 1, 1\) is empty"),
        (dict(x=torch.randn(2, 0, 9, 9), weight=torch.randn(16, 0, 1, 1)), ValueError, "is empty"),
        (dict(weight=torch.randn(16, 8, 0, 1)), ValueError, "is empty"),
        (dict(x=torch.randn(2, 8, 0, 9), padding=1), ValueError, "has no pixels; H and W must be at least 1"),
        (dict(weight=torch.randn(15, 4, 1, 1), groups=2), ValueError, "15 output channels, which groups=2 does not divide"),
        (dict(bias=torch.randn(1)), ValueError, r"bias must have shape \(16,\)"),
        (dict(residual=torch.randn(1, 16, 1, 1)), ValueError, r"shape \(2, 16, 9, 9\) \(no broadcasting\), got \(1, 16, 1, 1\)"),
        (dict(residual=torch.randn(16, 9, 9)), ValueError, "residual must have the output's shape"),
    ],
)
def test_invalid_arguments_raise_clear_errors(change, error, match):
    args = dict(x=torch.randn(2, 8, 9, 9), weight=torch.randn(16, 8, 1, 1), bias=None, residual=None)
    args.update(change)
    kwargs = dict(backend="torch")
    kwargs.update({k: args.pop(k) for k in ("stride", "padding", "dilation", "groups", "relu", "backend") if k in args})
    with pytest.raises(error, match=match):
        ops.conv2d_bias_act(args["x"], args["weight"], args["bias"], args["residual"], **kwargs)


@pytest.mark.parametrize(
    "x, y, backend, error, match",
    [
        (torch.randn(2, 3), torch.randn(3, 2), "torch", ValueError, "one shape"),
        (torch.randn(2, 3), torch.randn(1, 3), "torch", ValueError, r"one shape \(no broadcasting\)"),
        (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "torch", TypeError, "y has dtype torch.float64 but"),
        (torch.randn(2, 3), torch.randn(2, 3, device="meta"), "torch", ValueError, "y is on meta but the input x is on cpu"),
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), "torch", TypeError, "int32; supported"),
        (None, torch.randn(2, 3), "torch", TypeError, "x must be a torch.Tensor, got NoneType"),
        (torch.randn(2, 3), [1.0, 2.0, 3.0], "torch", TypeError, "y must be a torch.Tensor, got list"),
        (torch.randn(2, 3), torch.randn(2, 3), "fast", ValueError, "unknown backend 'fast'"),
        (torch.randn(2, 3), torch.randn(2, 3), 1, TypeError, "backend must be a str"),
    ],
)
def test_add_relu_rejects_bad_arguments(x, y, backend, error, match):
    with pytest.raises(error, match=match):
        ops.add_relu(x, y, backend=backend)


def _counting(monkeypatch, name):
    """Replaces the registered op `name` used by the public functions with a wrapper that counts calls."""
    calls, op = [], getattr(ops, name)

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(ops, name, counted)
    return calls


class _Recording(TorchDispatchMode):
    """A dispatch mode (as torch.export and FakeTensor use) that lets every op through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "context, requires_grad, dispatched",
    [
        (torch.no_grad, True, False),
        (torch.inference_mode, False, False),
        (torch.enable_grad, False, False),  # nothing to record: no input requires grad
        (torch.enable_grad, True, True),  # autograd must see the op
        (_Recording, False, True),
        # Forward-mode AD: computed by the aten ops the fused op stands for, which have tangent rules (the
        # custom op has none): neither the plain call nor the dispatcher.
        (torch.autograd.forward_ad.dual_level, False, False),
    ],
)
def test_only_plain_eager_calls_skip_the_dispatcher(monkeypatch, context, requires_grad, dispatched):
    conv_calls, add_calls = _counting(monkeypatch, "_conv2d_bias_act"), _counting(monkeypatch, "_add_relu")
    x, weight, bias, res, kw = _make(CONV_CASES[3], requires_grad=requires_grad)
    with context():
        out = ops.conv2d_bias_act(x, weight, bias, res, backend="torch", **kw)
        summed = ops.add_relu(res, res, backend="torch")
    assert (len(conv_calls), len(add_calls)) == ((1, 1) if dispatched else (0, 0))
    assert_close_fp32(out.detach(), reference_conv(x, weight, bias, res, relu=True, **kw))
    torch.testing.assert_close(summed.detach(), (res + res).relu().detach())
