"""The Triton backend against a float64 PyTorch reference, under the numerical parity rule.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through the
interpreter: shapes here are ResNet's layers scaled down to a few channels and pixels. The test
marked `gpu` runs ResNet-50's real layer shapes on a CUDA device.

Eager error: the rule compares our error with eager PyTorch's in the same dtype on the same input,
so eager F.conv2d runs in that dtype on the same device. On CPU it accepts fp16 and bf16 (computing
in higher precision and rounding once); where eager cannot run a dtype on a device, the bound is
one unit in the last place of the dtype plus the floor (see `check_parity`).
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch

import fused_resnet as fr
from fused_resnet.backends import triton as triton_backend
from fused_resnet.call import ConvCall
from fused_resnet.backends.triton import runtime as triton_runtime
from fused_resnet.parity import FLOORS, Parity, parity, relative_error
from helpers import eager_conv, reference_conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = triton_backend.unavailable_reason(torch.device(DEVICE))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"triton backend unavailable: {_UNAVAILABLE}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def check_parity(out, *args):
    ref = reference_conv(*args)
    try:
        eager = eager_conv(*args, dtype=out.dtype)
    except (RuntimeError, NotImplementedError):
        eager = None
    if eager is None:
        bound = torch.finfo(out.dtype).eps + FLOORS[out.dtype]
        result = Parity(out.dtype, relative_error(out, ref), float("nan"), bound)
    else:
        result = parity(out, eager, ref)
    assert result.ok, str(result)


def in_layout(t: torch.Tensor, kind: str, generator) -> torch.Tensor:
    """`t`'s values as NCHW ("nchw"), channels_last ("cl") or a strided, non-contiguous view ("view")."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    wide = torch.randn(n, c, h, 2 * w, generator=generator).to(t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def make_conv(case, dtype, generator):
    """Random inputs for a conv case, scaled so that outputs are O(1), on DEVICE."""
    r, s = case["kernel"]
    n, c, h, w = case["x"]
    cout, groups = case["cout"], case["groups"]
    stride, padding, dilation = case["stride"], case["padding"], case["dilation"]
    fan_in = c // groups * r * s

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    x = in_layout(randn(n, c, h, w), case["layout"], generator)
    weight = randn(cout, c // groups, r, s, scale=fan_in**-0.5)
    bias = randn(cout) if case["bias"] else None
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    residual = in_layout(randn(n, cout, oh, ow), case["layout"], generator) if case["residual"] else None
    tensors = [t if t is None else t.to(DEVICE) for t in (x, weight, bias, residual)]
    return (*tensors, list(stride), list(padding), list(dilation), groups, case["relu"]), (n, cout, oh, ow)


def spec(x, cout, kernel, stride=1, padding=0, dilation=1, groups=1, *, bias=True, residual=False, relu=True,
         layout="cl"):
    """One conv case: input shape `x`, output channels, kernel size, conv arguments, epilogue, layout."""

    def two(v):
        return tuple(v) if isinstance(v, tuple) else (v, v)

    return dict(x=x, cout=cout, kernel=two(kernel), stride=two(stride), padding=two(padding),
                dilation=two(dilation), groups=groups, bias=bias, residual=residual, relu=relu, layout=layout)


def case(name, *args, **kwargs):
    return pytest.param(spec(*args, **kwargs), id=name)


BASIC_3X3 = spec((2, 8, 6, 6), 8, 3, padding=1, residual=True)


# ResNet's conv shapes, scaled down; the epilogue flags and input layouts vary across them.
CASES = [
    case("1x1_bottleneck_conv3", (2, 8, 5, 5), 12, 1, residual=True),
    case("1x1_s2_downsample", (2, 8, 7, 7), 16, 1, stride=2, relu=False, layout="nchw"),
    pytest.param(BASIC_3X3, id="3x3_basic_conv2"),
    case("3x3_s2", (2, 12, 7, 7), 16, 3, stride=2, padding=1, layout="view"),
    case("stem_7x7_s2_c3", (1, 3, 17, 15), 8, 7, stride=2, padding=3, layout="nchw"),
    case("grouped_g4", (2, 16, 6, 6), 16, 3, padding=1, groups=4),
    case("grouped_g2_16_per_group", (1, 32, 5, 5), 32, 3, stride=2, padding=1, groups=2, bias=False, residual=True),
    case("depthwise", (2, 8, 6, 6), 8, 3, padding=1, groups=8, relu=False, layout="nchw"),
    case("dilated_d2", (1, 8, 9, 9), 8, 3, padding=2, dilation=2, residual=True),
    case("odd_7x5", (2, 6, 7, 5), 10, 3, padding=1, bias=False, layout="view"),
    case("1x1_hw1", (3, 16, 1, 1), 8, 1, residual=True, relu=False, layout="nchw"),
    case("3x3_hw1", (2, 16, 1, 1), 8, 3, padding=1),
    case("channels_5_to_7", (2, 5, 6, 6), 7, 3, padding=1, residual=True, layout="view"),
    case("multi_tile", (2, 48, 9, 9), 40, 3, padding=1, residual=True),
    case("1x1_long_k", (1, 80, 4, 4), 36, 1, relu=False),
    case("3x3_unpadded", (2, 8, 7, 7), 8, 3, layout="nchw"),
    case("3x1_mixed_pairs", (2, 8, 7, 6), 8, (3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1), residual=True),
]


def run_backend(args, out_shape, dtype):
    """Calls the backend directly on an output filled with NaN, so that any element it leaves
    unwritten fails the test (the inputs are finite). Every case here is one the backend must serve."""
    reason = triton_backend.conv_unsupported_reason(ConvCall.of(*args[:8]))
    assert reason is None, f"the Triton backend refuses a case it must serve: {reason}"
    out = torch.full(out_shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    triton_backend.conv2d_bias_act(out, ConvCall.of(*args))
    assert not out.isnan().any(), "the kernel left elements of out unwritten"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv_case", CASES)
def test_conv_parity(conv_case, dtype):
    args, out_shape = make_conv(conv_case, dtype, torch.Generator().manual_seed(0))
    out = run_backend(args, out_shape, dtype)
    check_parity(out, *args)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("layout_kind", ["nchw", "cl", "view"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv_epilogue_and_layouts(bias, residual, relu, layout_kind, dtype):
    conv_case = spec((2, 6, 5, 7), 12, 3, stride=2, padding=1, bias=bias, residual=residual, relu=relu,
                     layout=layout_kind)
    args, out_shape = make_conv(conv_case, dtype, torch.Generator().manual_seed(1))
    check_parity(run_backend(args, out_shape, dtype), *args)


def test_conv_fp32_with_tf32_allowed_keeps_fp32_accuracy(monkeypatch):
    """With TF32 allowed (CUDA, cudnn.allow_tf32), fp32 runs as three TF32 products per step, which
    keeps fp32 accuracy. (The interpreter computes in fp32 whatever the precision; the GPU test
    test_fp32_tf32_accuracy_gpu checks the tensor-core path.)"""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    monkeypatch.setattr(conv, "use_tf32", lambda x: x.dtype == torch.float32)
    args, out_shape = make_conv(BASIC_3X3, torch.float32, torch.Generator().manual_seed(2))
    out = run_backend(args, out_shape, torch.float32)
    assert relative_error(out, reference_conv(*args)) < 1e-5


def test_conv_through_op(poisoned_outputs, monkeypatch, served_by):
    """End to end through fr.ops with backend="triton": the reference must not be used."""
    args, _ = make_conv(BASIC_3X3, torch.float16, torch.Generator().manual_seed(3))
    x, weight, bias, residual, stride, padding, dilation, groups, relu = args
    with served_by("triton"):
        out = fr.ops.conv2d_bias_act(x, weight, bias, residual, stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, relu=relu, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_parity(out, *args)


def test_conv_float64_falls_back_to_reference(fallback_allowed, served_by):
    args, _ = make_conv(BASIC_3X3, torch.float64, torch.Generator().manual_seed(4))
    assert "float64" in triton_backend.conv_unsupported_reason(ConvCall.of(*args[:8]))
    x, weight, bias, residual, stride, padding, dilation, groups, relu = args
    with pytest.warns(UserWarning, match="float64"), served_by("torch"):
        out = fr.ops.conv2d_bias_act(x, weight, bias, residual, stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, relu=relu, backend="triton")
    torch.testing.assert_close(out, reference_conv(*args))


def test_conv_too_many_groups_is_unsupported():
    x = torch.zeros(1, 65536, 1, 1, device=DEVICE)
    weight = torch.zeros(65536, 1, 1, 1, device=DEVICE)
    assert "groups" in triton_backend.conv_unsupported_reason(ConvCall.of(x, weight, groups=65536))


@pytest.mark.parametrize(
    "shape, stride, padding",
    [((2, 8, 5, 5), 1, 1), ((1, 3, 9, 7), 2, 3)],
    ids=["3x3", "stem_like"],
)
def test_conv_opcheck(shape, stride, padding):
    generator = torch.Generator().manual_seed(5)
    kernel = 3 if padding == 1 else 7
    x = torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(8, shape[1], kernel, kernel, generator=generator).to(DEVICE).requires_grad_()
    bias = torch.randn(8, generator=generator).to(DEVICE)
    oh = (shape[2] + 2 * padding - kernel) // stride + 1
    ow = (shape[3] + 2 * padding - kernel) // stride + 1
    residual = torch.randn(shape[0], 8, oh, ow, generator=generator).to(DEVICE)
    args = (x, weight, bias, residual, [stride] * 2, [padding] * 2, [1, 1], 1, True, "triton")
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act.default, args)


LIBRARY_CASES = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[9]]


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("conv_case", LIBRARY_CASES)
def test_triton_library_op_parity(poisoned_outputs, conv_case, dtype, monkeypatch, served_by):
    """fused_resnet_triton::conv2d_bias_act, the op export lowers to (lower_to="triton")."""
    from fused_resnet import triton_ops as library  # noqa: F401  (registers the fused_resnet_triton ops)

    args, out_shape = make_conv(conv_case, dtype, torch.Generator().manual_seed(9))
    with served_by("triton"):
        out = torch.ops.fused_resnet_triton.conv2d_bias_act(*args)
    assert out.shape == out_shape and out.is_contiguous(memory_format=torch.channels_last)
    assert not out.isnan().any(), "the kernel left elements of out unwritten"
    check_parity(out, *args)


def test_triton_library_op_computes_unsupported_cases_with_aten(fallback_allowed, served_by):
    from fused_resnet import triton_ops as library  # noqa: F401  (registers the fused_resnet_triton ops)

    args, _ = make_conv(BASIC_3X3, torch.float64, torch.Generator().manual_seed(10))
    with pytest.warns(UserWarning, match="'triton' does not support this convolution.*float64"), served_by("torch"):
        out = torch.ops.fused_resnet_triton.conv2d_bias_act(*args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference_conv(*args))


def test_triton_library_ops_opcheck():
    from fused_resnet import triton_ops as library  # noqa: F401  (registers the fused_resnet_triton ops)

    # The schema and the fake implementations; tracing through the kernel itself (wrap_triton)
    # is not possible in Triton's interpreter, only on a GPU (tests/test_export.py, AOTInductor).
    tests = ("test_schema", "test_faketensor")
    args, _ = make_conv(BASIC_3X3, torch.float32, torch.Generator().manual_seed(11))
    torch.library.opcheck(torch.ops.fused_resnet_triton.conv2d_bias_act.default, args, test_utils=tests)
    x, y = torch.randn(2, 3, 4, 5, device=DEVICE), torch.randn(2, 3, 4, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.fused_resnet_triton.add_relu.default, (x, y), test_utils=tests)


def test_configs_shrink_to_the_layer_but_never_depend_on_a_symbolic_batch():
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    small = conv.shrunk_configs(49, 16, 64)  # batch 1, 7x7 output, 16 channels per group
    assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] == 16 for c in small)
    # While AOTInductor traces a dynamic batch, N * OH * OW is a symbol: it must cap nothing.
    symbolic = conv.shrunk_configs("s0 * 49", 16, 64)
    assert max(c.kwargs["BLOCK_M"] for c in symbolic) == 256
    for configs in (small, symbolic):
        assert len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                    for c in configs}) == len(configs)  # no duplicates


def test_gemm_weight_is_cached_and_follows_updates():
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    weight = torch.randn(8, 4, 3, 3, device=DEVICE)
    channels_last = weight.contiguous(memory_format=torch.channels_last)
    assert conv.gemm_weight(channels_last).data_ptr() == channels_last.data_ptr()  # a view, no copy
    first = conv.gemm_weight(weight)
    assert conv.gemm_weight(weight) is first
    torch.testing.assert_close(first, weight.permute(0, 2, 3, 1), rtol=0, atol=0)
    with torch.no_grad():
        weight.add_(1.0)  # bumps the version counter: the cached copy is stale
    torch.testing.assert_close(conv.gemm_weight(weight), weight.permute(0, 2, 3, 1), rtol=0, atol=0)


# add_relu -------------------------------------------------------------------------------------


def add_relu_reference(x, y, dtype):
    return (x.to(dtype) + y.to(dtype)).relu()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape, memory_format",
    [
        ((2, 5, 7, 3), torch.contiguous_format),
        ((2, 5, 7, 3), torch.channels_last),
        ((1, 1, 1, 1), torch.channels_last),
        ((3, 1000), torch.contiguous_format),
        ((70000,), torch.contiguous_format),
    ],
    ids=["nchw", "channels_last", "single", "2d", "more_than_one_block"],
)
def test_add_relu_parity(shape, memory_format, dtype):
    generator = torch.Generator().manual_seed(6)
    x, y = (torch.randn(shape, generator=generator).to(DEVICE, dtype).contiguous(memory_format=memory_format)
            for _ in range(2))
    assert triton_backend.add_relu_unsupported_reason(x, y) is None
    out = torch.full_like(x, float("nan"))
    triton_backend.add_relu(out, x, y)
    assert not out.isnan().any(), "the kernel left elements of out unwritten"
    result = parity(out, add_relu_reference(x, y, dtype), add_relu_reference(x, y, torch.float64))
    assert result.ok, str(result)


def test_add_relu_through_op(poisoned_outputs, monkeypatch, served_by):
    generator = torch.Generator().manual_seed(7)
    x, y = (torch.randn(2, 6, 5, 5, generator=generator).to(DEVICE).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    with served_by("triton"):
        out = fr.ops.add_relu(x, y, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (x + y).relu(), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fused_resnet.add_relu.default, (x, y, "triton"))


def test_add_relu_mixed_layouts_fall_back(fallback_allowed):
    x = torch.randn(2, 6, 5, 5, device=DEVICE)
    y = x.contiguous(memory_format=torch.channels_last) * 2
    assert triton_backend.add_relu_unsupported_reason(x, y) is not None
    assert "float64" in triton_backend.add_relu_unsupported_reason(x.double(), x.double())
    with pytest.warns(UserWarning, match="memory format"):
        out = fr.ops.add_relu(x, y, backend="triton")
    torch.testing.assert_close(out, (x + y).relu())


# Launches: the tensors' device, CUDA graph captures, the device's shared memory --------------------


class Recorder:
    """A stand-in for a context manager factory: records its arguments and whether it is entered."""

    def __init__(self, wrapped=None):
        self.calls, self.depth, self.wrapped = [], 0, wrapped

    @contextlib.contextmanager
    def __call__(self, arg):
        self.calls.append(arg)
        with self.wrapped(arg) if self.wrapped else contextlib.nullcontext():
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1


def test_on_device_of_makes_the_tensors_gpu_current(monkeypatch):
    device = Recorder()
    monkeypatch.setattr(torch.cuda, "device", device)
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with triton_runtime.on_device_of(on_gpu1):
        assert device.depth == 1
    with triton_runtime.on_device_of(torch.ones(1)):  # a CPU tensor (the interpreter): nothing to select
        pass
    assert device.calls == [torch.device("cuda", 1)]


def test_every_triton_launch_runs_under_its_tensors_device(monkeypatch):
    """The backend's kernels and the triton_op wrappers (library.py) alike: each kernel launch
    happens inside on_device_of(a tensor of the call), and still computes the right values."""
    from fused_resnet import triton_ops as library  # noqa: F401
    from fused_resnet.backends.triton import add_relu_kernel

    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    guard = Recorder(triton_runtime.on_device_of)
    monkeypatch.setattr(conv, "on_device_of", guard)
    monkeypatch.setattr(add_relu_kernel, "on_device_of", guard)
    launched_inside = []
    for kernel in (conv._conv_kernel, add_relu_kernel._add_relu_kernel):
        def run(*args, _run=kernel.run, **kwargs):
            launched_inside.append(guard.depth == 1)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    args, out_shape = make_conv(BASIC_3X3, torch.float32, torch.Generator().manual_seed(14))
    check_parity(run_backend(args, out_shape, torch.float32), *args)
    check_parity(torch.ops.fused_resnet_triton.conv2d_bias_act(*args), *args)
    x, y = torch.randn(2, 3, 4, 5, device=DEVICE), torch.randn(2, 3, 4, 5, device=DEVICE)
    out = torch.empty_like(x)
    triton_backend.add_relu(out, x, y)
    torch.testing.assert_close(out, (x + y).relu())
    torch.testing.assert_close(torch.ops.fused_resnet_triton.add_relu(x, y), (x + y).relu())
    assert launched_inside == [True] * 4
    assert [t.device for t in guard.calls] == [torch.device(DEVICE)] * 4


def kernel_arguments(x_shape, cout, kernel, dtype, precision, padding=1):
    """The conv kernel's arguments and constexprs for a layer, on meta tensors (nothing is launched)."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    n, c, h, w = x_shape
    x = torch.empty(x_shape, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
    weight = torch.empty(cout, kernel, kernel, c, dtype=dtype, device="meta")
    oh, ow = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
    out = torch.empty(n, cout, oh, ow, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
    return conv.kernel_arguments(out, x, weight, None, None, (1, 1), (padding,) * 2, (1, 1), 1, True, precision)


def named_arguments(*layer):
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    return conv.named_arguments(*kernel_arguments(*layer))


def a_gpu(monkeypatch, conv, shared_memory=232_448, capability=(9, 0), sms=132):
    """A fake CUDA tensor, and its device's properties as the launch path reads them."""
    properties = SimpleNamespace(shared_memory_per_block_optin=shared_memory, major=capability[0],
                                 minor=capability[1], multi_processor_count=sms)
    monkeypatch.setattr(conv, "_device_properties", lambda device: properties)
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), element_size=lambda: 2)


def test_no_tuning_inside_a_cuda_graph_capture(monkeypatch):
    """While a graph is captured, a layer Triton's autotuner has not tuned gets the size rule's
    tile, without the autotuner (which would time and synchronise inside the capture), and nothing
    is remembered for it; a layer it has tuned gets the tuned tile. Outside a capture: the autotuner."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    monkeypatch.setattr(conv, "interpreting", lambda: False)
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "1")
    monkeypatch.setattr(conv._conv_kernel_tuned, "cache", {})
    x = a_gpu(monkeypatch, conv)
    named = named_arguments((8, 64, 56, 56), 64, 3, torch.float16, "tf32")
    m, cout_g, k_step = conv.problem_size(named)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert conv._kernel_and_meta(x, named, 1) == (conv._conv_kernel_tuned, {})

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kernel, meta = conv._kernel_and_meta(x, named, 1)
    rule = conv._untuned_config(conv.fitting_configs(named, 232_448, 90), m, cout_g, 1, x.device)
    assert kernel is conv._conv_kernel and meta == conv._meta(rule)
    assert conv._conv_kernel_tuned.cache == {}

    tuned = conv.shrunk_configs(m, cout_g, k_step)[-2]
    conv._conv_kernel_tuned.cache[conv._tuning_key(named)] = tuned
    assert conv._kernel_and_meta(x, named, 1) == (conv._conv_kernel, conv._meta(tuned))


def test_the_capture_path_looks_up_the_autotuners_own_key(monkeypatch):
    """_tuning_key must be the key Triton's autotuner files its choice under: with it in the
    autotuner's memory, a call runs the stored config without timing anything."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    tuner = conv._conv_kernel_tuned
    args, constexprs = kernel_arguments((8, 64, 56, 56), 64, 3, torch.float16, "tf32")
    named = conv.named_arguments(args, constexprs)
    stored = conv.shrunk_configs(*conv.problem_size(named))[-1]
    monkeypatch.setattr(tuner, "cache", {conv._tuning_key(named): stored})
    ran = []
    monkeypatch.setattr(tuner, "fn", SimpleNamespace(run=lambda *args, **kwargs: ran.append(kwargs)))
    monkeypatch.setattr(tuner, "_bench", lambda *args, **kwargs: pytest.fail("the autotuner timed configs"))
    tuner.run(*args, grid=(1,), warmup=False, **constexprs)
    assert len(ran) == 1 and {k: ran[0][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")} == stored.kwargs


@pytest.mark.parametrize(
    "capability, limit, kept",
    [
        ((8, 6), 101_376, [(64, 32, 64, 4, 4), (32, 64, 64, 4, 4), (64, 16, 32, 4, 3)]),
        ((8, 0), 166_912, [(128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 32, 64, 4, 4),
                           (32, 64, 64, 4, 4), (128, 16, 64, 4, 3), (64, 16, 32, 4, 3)]),
        ((9, 0), 232_448, [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                           (64, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 32, 64, 4, 4), (32, 64, 64, 4, 4),
                           (128, 16, 64, 4, 3), (64, 16, 32, 4, 3)]),
    ],
    ids=["sm86", "sm80", "sm90"],
)
def test_pruning_keeps_what_fits_the_devices_shared_memory_and_registers(monkeypatch, capability, limit, kept):
    """fp32 (tf32x3) on a 512-channel 3x3 layer: pipelines of 3 or 4 stages of (BLOCK_M + BLOCK_N) x
    BLOCK_K fp32 tiles (+ one B tile on Hopper); 128x256 and 256x128 hold too many accumulators."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    a_gpu(monkeypatch, conv, shared_memory=limit, capability=capability)
    args, constexprs = kernel_arguments((256, 512, 28, 28), 512, 3, torch.float32, "tf32x3")
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
             for c in conv._prune_configs(conv._TUNING_CONFIGS, dict(zip(conv._conv_kernel.arg_names, args)),
                                          **constexprs)]
    assert tiles == kept


def test_pruning_asks_each_device_once_for_its_shared_memory_and_capability(monkeypatch):
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    asked = []

    def properties(device):
        asked.append(device)
        if device.index == 0:
            return SimpleNamespace(shared_memory_per_block_optin=166_912, major=8, minor=0)
        return SimpleNamespace(shared_memory_per_block_optin=101_376, major=8, minor=9)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    conv._device_properties.cache_clear()
    try:
        found = [conv._shared_memory_and_arch(torch.device("cuda", i)) for i in (0, 1, 0)]
    finally:
        conv._device_properties.cache_clear()
    assert found == [(166_912, 80), (101_376, 89), (166_912, 80)]
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]


# ResNet-50's layers at full size, on a GPU --------------------------------------------------------

RESNET50_LAYERS = [
    case("stem", (2, 3, 224, 224), 64, 7, stride=2, padding=3, layout="nchw"),
    case("layer1_conv1", (2, 64, 56, 56), 64, 1),
    case("layer1_conv2", (2, 64, 56, 56), 64, 3, padding=1),
    case("layer1_conv3", (2, 64, 56, 56), 256, 1, residual=True),
    case("layer1_downsample", (2, 64, 56, 56), 256, 1, relu=False),
    case("layer2_conv1", (2, 256, 56, 56), 128, 1),
    case("layer2_conv2_s2", (2, 128, 56, 56), 128, 3, stride=2, padding=1),
    case("layer2_conv3", (2, 128, 28, 28), 512, 1, residual=True),
    case("layer2_downsample_s2", (2, 256, 56, 56), 512, 1, stride=2, relu=False),
    case("layer3_conv2", (2, 256, 14, 14), 256, 3, padding=1),
    case("layer3_conv3", (2, 256, 14, 14), 1024, 1, residual=True),
    case("layer4_conv1", (2, 1024, 14, 14), 512, 1),
    case("layer4_conv2_s2", (2, 512, 14, 14), 512, 3, stride=2, padding=1),
    case("layer4_conv3", (2, 512, 7, 7), 2048, 1, residual=True),
    case("layer4_conv2_dilated", (2, 512, 28, 28), 512, 3, padding=2, dilation=2),
    case("resnext50_32x4d_conv2", (2, 128, 56, 56), 128, 3, padding=1, groups=32),
    case("resnext101_64x4d_conv2", (2, 256, 56, 56), 256, 3, padding=1, groups=64),
    case("resnext101_32x8d_conv2_s2", (2, 512, 56, 56), 512, 3, stride=2, padding=1, groups=32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "dtype, allow_tf32",
    [(torch.float16, True), (torch.bfloat16, True), (torch.float32, True), (torch.float32, False)],
    ids=["fp16", "bf16", "fp32_tf32", "fp32_ieee"],
)
@pytest.mark.parametrize("conv_case", RESNET50_LAYERS)
def test_conv_parity_resnet50_layers_gpu(conv_case, dtype, allow_tf32, monkeypatch):
    # The flag applies to eager cuDNN and to our kernel alike; fp32 is compared both ways.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    if dtype != torch.float16:
        # fp16 goes through the autotuner; the other dtypes take the untuned tile, which saves
        # compiling every config for them (test_every_tile_config_gpu checks each config).
        monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")
    args, out_shape = make_conv(conv_case, dtype, torch.Generator().manual_seed(8))
    check_parity(run_backend(args, out_shape, dtype), *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32_tf32"])
@pytest.mark.parametrize("conv_case", [RESNET50_LAYERS[0], RESNET50_LAYERS[5], RESNET50_LAYERS[-3]])
def test_every_tile_config_gpu(conv_case, dtype, monkeypatch):
    """Each config the autotuner may pick, launched on its own (the model tests run untuned)."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    args, out_shape = make_conv(conv_case, dtype, torch.Generator().manual_seed(12))
    x, weight, bias, residual, stride, padding, dilation, groups, relu = args
    out = torch.empty(out_shape, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    arguments = conv.kernel_arguments(out, x, conv.gemm_weight(weight), bias, residual, stride, padding, dilation,
                                      groups, relu, conv.input_precision(x))
    configs = conv.fitting_configs(conv.named_arguments(*arguments), *conv._shared_memory_and_arch(x.device))
    assert configs
    for config in configs:
        monkeypatch.setattr(conv, "_kernel_and_meta", lambda *a, config=config: (conv._conv_kernel, conv._meta(config)))
        check_parity(run_backend(args, out_shape, dtype), *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "conv_case", [p for p in RESNET50_LAYERS if p.id in ("stem", "layer4_conv2_s2", "resnext50_32x4d_conv2")]
)
def test_fp32_tf32_accuracy_gpu(conv_case, monkeypatch):
    """fp32 with TF32 allowed stays within fp32 accuracy on long sums (plain TF32 would be ~1e-4 off),
    on dense, stem and grouped layers alike: so it passes parity whatever algorithm cuDNN picks."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    args, out_shape = make_conv(conv_case, torch.float32, torch.Generator().manual_seed(13))
    out = run_backend(args, out_shape, torch.float32)
    assert relative_error(out, reference_conv(*args)) < 2e-5


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_follow_the_tensors_to_the_second_gpu_gpu():
    """cuda:0 current, tensors on cuda:1: the kernels must run on cuda:1 (the wrong device would
    fault or leave the NaN-filled output unwritten)."""
    from fused_resnet import triton_ops as library  # noqa: F401  (registers the fused_resnet_triton ops)

    args, out_shape = make_conv(BASIC_3X3, torch.float16, torch.Generator().manual_seed(15))
    args = tuple(a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in args)
    x, y = torch.randn(2, 3, 4, 5, device="cuda:1"), torch.randn(2, 3, 4, 5, device="cuda:1")
    out = torch.full(out_shape, float("nan"), dtype=torch.float16, device="cuda:1")
    out = out.contiguous(memory_format=torch.channels_last)
    with torch.cuda.device(0):
        triton_backend.conv2d_bias_act(out, ConvCall.of(*args))
        op_out = torch.ops.fused_resnet_triton.conv2d_bias_act(*args)
        summed = torch.ops.fused_resnet_triton.add_relu(x, y)
    torch.cuda.synchronize(1)
    check_parity(out, *args)
    check_parity(op_out, *args)
    torch.testing.assert_close(summed, (x + y).relu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturing_a_layer_not_yet_tuned_gpu(monkeypatch):
    """A CUDA graph captured around a layer Triton's autotuner has not seen: the size rule's tile is
    captured, the replay computes the layer, and the autotuner remembers nothing for it."""
    conv = importlib.import_module("fused_resnet.backends.triton.conv")
    monkeypatch.setattr(conv._conv_kernel_tuned, "cache", {})
    args, out_shape = make_conv(BASIC_3X3, torch.float16, torch.Generator().manual_seed(16))
    out = torch.empty(out_shape, dtype=torch.float16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")
    triton_backend.conv2d_bias_act(out, ConvCall.of(*args))  # compiles the size rule's kernel outside the capture
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "1")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_backend.conv2d_bias_act(out, ConvCall.of(*args))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_parity(out, *args)
    assert conv._conv_kernel_tuned.cache == {}
