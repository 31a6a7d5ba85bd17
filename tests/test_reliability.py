"""Reliability of the fused ops: valid edge cases that must match eager PyTorch, backend selection,
concurrent callers, CUDA streams and tensors over 2**31 elements.

Every test that is not marked `gpu` runs on the tensors' device of this machine: on the CPU with the
Triton backend under its interpreter (tiny shapes), on a GPU with every available backend. Each test
that names a backend checks that this backend computed the result (the suite runs with
FUSED_RESNET_STRICT=1, and `served_by` reads the record). Argument errors are tested in test_ops.py.
"""

from __future__ import annotations

import copy
import importlib
import random
import threading
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import fused_resnet as fr
from fused_resnet import backends, dispatch, ops
from fused_resnet.call import ConvCall
from fused_resnet.nn import FusedBasicBlock
from fused_resnet.parity import parity, randomize_bn_
from helpers import assert_parity, eager_conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On the CPU: "triton" (interpreter) and "torch". On a GPU: every backend that can run there.
BACKENDS = backends.available(DEVICE)
GPU_BACKENDS = backends.available("cuda") if torch.cuda.is_available() else list(backends.NAMES)
# The backends with kernels of their own. The reference computes with eager PyTorch's ops, so
# comparing it with eager proves nothing: the op-level checks run these only, and
# test_float16_near_overflow_reference_is_eager_bit_for_bit checks the reference's plumbing once.
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
# The dtypes a backend's kernels serve, where not all of float32, float16 and bfloat16.
SERVED_DTYPES = {"cuda": (torch.float16, torch.bfloat16)}
if "onednn" in BACKENDS:  # float16 only on CPUs with AVX512-FP16 or AVX-NE-CONVERT: ask the backend
    SERVED_DTYPES["onednn"] = tuple(
        dtype
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        if backends.get("onednn").conv_unsupported_reason(ConvCall.of(torch.empty(0, dtype=dtype), None)) is None
    )


def served_dtype(backend: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """`dtype` if `backend` serves it, else the first dtype it serves."""
    served = SERVED_DTYPES.get(backend)
    return dtype if served is None or dtype in served else served[0]


@pytest.fixture(autouse=True)
def _full_fp32(monkeypatch):
    """Eager cuDNN uses TF32 for some small fp32 convs and not for others: compare in full fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def assert_matches_eager(out, *args, **conv):
    """The parity rule: our error against float64 at most 2x eager's in the same dtype, plus a floor."""
    assert_parity(out, *args, **conv)


def randn(*shape, generator, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)


def conv_inputs(n, c, h, w, cout, kernel, *, generator, dtype=torch.float32, residual_shape=None, groups=1):
    """x, weight (fan-in scaled), bias and a residual of `residual_shape` (None: no residual)."""
    x = randn(n, c, h, w, generator=generator, dtype=dtype)
    fan_in = c // groups * kernel**2
    weight = randn(cout, c // groups, kernel, kernel, generator=generator, dtype=dtype, scale=fan_in**-0.5)
    bias = randn(cout, generator=generator, dtype=dtype)
    residual = None if residual_shape is None else randn(*residual_shape, generator=generator, dtype=dtype)
    return x, weight, bias, residual


# Views of an (N, C, H, W) tensor: the same values in other memory layouts, all with positive strides
# (torch has no negative strides). "expanded" keeps only the first image and repeats it with stride 0.
VIEWS = ["nchw", "channels_last", "transposed", "permuted", "sliced", "expanded"]


def as_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    n, c, h, w = t.shape
    if kind == "nchw":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "transposed":  # W is the outer spatial dimension in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "permuted":  # memory order (H, N, W, C)
        return t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if kind == "sliced":  # a window of a larger tensor: storage offset, gaps in every dimension
        big = torch.full((n, c + 2, 2 * h, 3 * w), float("nan"), dtype=t.dtype, device=t.device)
        view = big[:, 1 : c + 1, ::2, ::3]
        view.copy_(t)
        return view
    if kind == "expanded":
        return t[:1].expand(n, c, h, w)
    raise ValueError(kind)


# Valid edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_empty_batch(backend, memory_format):
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, residual = conv_inputs(0, 8, 5, 5, 8, 3, generator=generator, residual_shape=(0, 8, 3, 3))
    x, residual = (t.contiguous(memory_format=memory_format) for t in (x, residual))
    block = randomize_bn_(BasicBlock(8, 8).eval(), generator).to(DEVICE)
    with dispatch.record_serving() as served, torch.no_grad():
        out = ops.conv2d_bias_act(x, weight, bias, residual, stride=2, padding=1, backend=backend)
        assert ops.add_relu(residual, residual, backend=backend).shape == (0, 8, 3, 3)
        assert FusedBasicBlock.from_block(block, backend)(x).shape == (0, 8, 5, 5)
    assert out.shape == (0, 8, 3, 3) and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert served == [], "an empty batch reached a backend"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "kernel, stride, padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (7, 2, 3)], ids=["1x1", "3x3", "3x3_s2", "7x7_s2"]
)
def test_one_by_one_maps(backend, kernel, stride, padding, served_by):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias, residual = conv_inputs(
        3, 8, 1, 1, 8, kernel, generator=generator, dtype=served_dtype(backend), residual_shape=(3, 8, 1, 1)
    )
    conv = dict(stride=stride, padding=padding)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, backend=backend, **conv)
    assert out.shape == (3, 8, 1, 1)
    assert_matches_eager(out, x, weight, bias, residual, **conv)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("x_view", VIEWS)
def test_input_views(backend, x_view, served_by):
    generator = torch.Generator().manual_seed(2)
    x, weight, bias, residual = conv_inputs(
        2, 8, 6, 5, 8, 3, generator=generator, dtype=served_dtype(backend), residual_shape=(2, 8, 6, 5)
    )
    x = as_view(x, x_view)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, padding=1, backend=backend)
    assert_matches_eager(out, x, weight, bias, residual, padding=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual_view", VIEWS)
def test_residual_views(backend, residual_view, served_by):
    generator = torch.Generator().manual_seed(3)
    x, weight, bias, residual = conv_inputs(
        2, 8, 7, 7, 8, 3, generator=generator, dtype=served_dtype(backend), residual_shape=(2, 8, 4, 4)
    )
    residual = as_view(residual, residual_view)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, stride=2, padding=1, backend=backend)
    assert_matches_eager(out, x, weight, bias, residual, stride=2, padding=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weight_and_bias_views(backend, served_by):
    """A weight stored with R and S swapped, channels_last, or expanded over Cout; a bias with stride 3."""
    generator = torch.Generator().manual_seed(4)
    dtype = served_dtype(backend)
    x, weight, _, residual = conv_inputs(2, 8, 5, 6, 8, 3, generator=generator, dtype=dtype, residual_shape=(2, 8, 5, 6))
    bias = randn(24, generator=generator, dtype=dtype)[::3]
    for w in (as_view(weight, "transposed"), as_view(weight, "channels_last"), as_view(weight, "expanded")):
        with served_by(backend):
            out = ops.conv2d_bias_act(x, w, bias, residual, padding=1, backend=backend)
        assert_matches_eager(out, x, w, bias, residual, padding=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_residual_is_the_input(backend, memory_format, kernel, served_by):
    """Aliasing: the residual is x itself (Cin = Cout, stride 1, same size), and add_relu(x, x)."""
    generator = torch.Generator().manual_seed(5)
    x, weight, bias, _ = conv_inputs(2, 8, 5, 5, 8, kernel, generator=generator, dtype=served_dtype(backend))
    x = x.contiguous(memory_format=memory_format)
    before = x.clone()
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, x, padding=kernel // 2, backend=backend)
        doubled = ops.add_relu(x, x, backend=backend)
    assert_matches_eager(out, x, weight, bias, x, padding=kernel // 2)
    torch.testing.assert_close(doubled, (x + x).relu(), rtol=0, atol=0)
    assert torch.equal(x, before), "an input was written"
    assert out.data_ptr() != x.data_ptr() and doubled.data_ptr() != x.data_ptr()


def _special_values(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`t` with a few NaN, +Inf and -Inf at random positions."""
    t = t.clone()
    flat = t.view(-1)
    positions = torch.randperm(flat.numel(), generator=generator)[:6].to(flat.device)
    flat[positions] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 2, dtype=t.dtype, device=t.device)
    return t


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own, from Triton's interpreter
@pytest.mark.parametrize(
    "backend, dtype",
    [
        pytest.param(backend, dtype, id=f"{backend}-{name}")
        for backend in KERNEL_BACKENDS
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"))
        if served_dtype(backend, dtype) == dtype
    ],
)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_nan_and_inf_propagate_like_eager(backend, dtype, relu, served_by):
    """NaN and +-Inf land where eager puts them (torch.relu keeps NaN, maps -Inf to 0)."""
    generator = torch.Generator().manual_seed(6)
    x, weight, bias, residual = conv_inputs(
        2, 8, 6, 6, 8, 3, generator=generator, dtype=dtype, residual_shape=(2, 8, 6, 6)
    )
    x, residual = _special_values(x, generator), _special_values(residual, generator)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, padding=1, relu=relu, backend=backend)
        pair = ops.add_relu(x, residual, backend=backend)
    expected = eager_conv(x, weight, bias, residual, padding=1, relu=relu)
    assert expected.isnan().any() and expected.isinf().any()
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out == float("inf"), expected == float("inf"))
    assert torch.equal(out == -float("inf"), expected == -float("inf"))
    finite = expected.isfinite()
    reference = eager_conv(x, weight, bias, residual, padding=1, relu=relu, dtype=torch.float64)
    result = parity(out[finite], expected[finite], reference[finite])
    assert result.ok, str(result)
    torch.testing.assert_close(pair, (x + residual).relu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if served_dtype(b, torch.float16) == torch.float16])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_float16_overflow_saturates_like_eager(backend, relu, served_by):
    """fp16 sums past 65504 become Inf, as in eager. Every value is exact in fp16 and fp32 and none
    sits where eager's rounding of the conv before the residual add would change the outcome, so
    each backend must agree with eager bit for bit."""
    # out channel: conv (two taps of x = 256 times w), bias, residual -> fp16 result
    channels = [
        (40000, 0, 0),  # 80000 -> inf
        (-40000, 0, 0),  # -80000 -> -inf (0 after ReLU)
        (30000, 0, 0),  # 60000, finite
        (30000, 0, 10000),  # 60000 + 10000 -> inf
        (32752, 0, 0),  # 65504, the largest finite fp16
        (32768, 0, 0),  # 65536 -> inf
        (15000, 36864, 0),  # 30000 + 36864 -> inf
        (-20000, -40000, 0),  # -80000 -> -inf
    ]
    dtype = torch.float16
    x = torch.zeros(2, 8, 2, 3, dtype=dtype, device=DEVICE)
    x[:, :2] = 256
    weight = torch.zeros(8, 8, 1, 1, dtype=dtype, device=DEVICE)
    weight[:, :2] = torch.tensor([tap / 256 for tap, _, _ in channels], dtype=dtype, device=DEVICE)[:, None, None, None]
    bias = torch.tensor([b for _, b, _ in channels], dtype=dtype, device=DEVICE)
    residual = torch.tensor([r for _, _, r in channels], dtype=dtype, device=DEVICE)
    residual = residual[None, :, None, None].expand(2, 8, 2, 3)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, relu=relu, backend=backend)
    expected = eager_conv(x, weight, bias, residual, relu=relu)
    per_channel = expected[0, :, 0, 0].tolist()
    inf = float("inf")
    assert per_channel == [inf, 0 if relu else -inf, 60000, inf, 65504, inf, inf, 0 if relu else -inf]
    assert torch.equal(out, expected)


def test_float16_near_overflow_reference_is_eager_bit_for_bit():
    """Random fp16 data scaled so that many outputs pass 65504: the reference backend rounds where
    eager does, in the same order (conv with bias, then + residual, then ReLU)."""
    generator = torch.Generator().manual_seed(7)
    x, weight, bias, residual = conv_inputs(
        2, 16, 6, 6, 16, 3, generator=generator, dtype=torch.float16, residual_shape=(2, 16, 6, 6)
    )
    x, bias, residual = x * 200, bias * 30000, residual * 30000
    weight = weight * 200
    for relu in (True, False):
        out = ops.conv2d_bias_act(x, weight, bias, residual, padding=1, relu=relu, backend="torch")
        expected = eager_conv(x, weight, bias, residual, padding=1, relu=relu)
        assert expected.isinf().float().mean() > 0.1
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())


# float16 and bfloat16 cannot hold weights folded with these variances: the backends serving float32.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if served_dtype(b) == torch.float32])
def test_bn_running_var_near_zero_or_huge(backend, served_by):
    """Folding in float64 keeps extreme BatchNorm statistics finite and exact through fr.fuse."""
    generator = torch.Generator().manual_seed(8)
    block = randomize_bn_(BasicBlock(8, 8).eval(), generator)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.eps = 0.0
            bn.running_var.copy_(torch.tensor([1e-30, 1e-20, 1e-12, 1e-3, 1.0, 1e6, 1e20, 1e30]))
    fused = fr.fuse(block, backend=backend).to(DEVICE)
    for name, parameter in fused.named_parameters():
        assert parameter.isfinite().all(), name
    x = randn(2, 8, 5, 5, generator=generator)
    with torch.no_grad(), served_by(backend):
        out = fused(x)
    with torch.no_grad():
        reference = block.double().to(DEVICE)(x.double())
        eager_out = block.float()(x)
    result = parity(out, eager_out, reference)
    assert out.isfinite().all() and result.ok, str(result)


class _TwoBlocksSharingAConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = BasicBlock(8, 8), BasicBlock(8, 8)
        self.second.conv1 = self.first.conv1  # one module object, two BatchNorms after it

    def forward(self, x):
        return self.second(self.first(x))


class _SequentialOfOneBlockTwice(nn.Sequential):
    def __init__(self):
        block = BasicBlock(8, 8)
        super().__init__(block, block)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "build", [_TwoBlocksSharingAConv, _SequentialOfOneBlockTwice], ids=["shared_conv", "block_twice"]
)
def test_shared_modules_fuse_correctly(backend, build, served_by):
    generator = torch.Generator().manual_seed(9)
    model = randomize_bn_(build().eval(), generator).to(DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = served_dtype(backend)
    fused = fr.fuse(model, backend=backend, dtype=dtype)
    x = randn(2, 8, 5, 5, generator=generator)
    with torch.no_grad(), served_by(backend):
        out = fused(x.to(dtype))
    with torch.no_grad():
        expected = copy.deepcopy(model).to(dtype)(x.to(dtype))
        result = parity(out, expected, copy.deepcopy(model).double()(x.double()))
    assert result.ok, str(result)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "fr.fuse modified its input"
    if build is _TwoBlocksSharingAConv:
        assert model.second.conv1 is model.first.conv1


def test_a_block_used_twice_is_fused_at_both_places():
    model = randomize_bn_(_SequentialOfOneBlockTwice().eval())
    fused = fr.fuse(model, backend="torch")
    assert all(isinstance(block, FusedBasicBlock) for block in fused)
    assert fused[0] is fused[1]  # shared as in the input model
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        result = parity(fused(x), model(x), copy.deepcopy(model).double()(x.double()))
    assert result.ok, str(result)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inputs_requiring_grad_under_no_grad(backend, mode, served_by):
    generator = torch.Generator().manual_seed(10)
    x, weight, bias, residual = conv_inputs(
        2, 8, 5, 5, 8, 3, generator=generator, dtype=served_dtype(backend), residual_shape=(2, 8, 5, 5)
    )
    for t in (x, weight, bias, residual):
        t.requires_grad_()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        with served_by(backend):
            out = ops.conv2d_bias_act(x, weight, bias, residual, padding=1, backend=backend)
            pair = ops.add_relu(x, x, backend=backend)
        expected = eager_conv(x, weight, bias, residual, padding=1)
        result = parity(out, expected, eager_conv(x, weight, bias, residual, padding=1, dtype=torch.float64))
    assert not out.requires_grad and out.grad_fn is None and not pair.requires_grad
    assert result.ok, str(result)


def test_export_keeps_the_batch_dynamic():
    """The checks run on fake tensors with symbolic sizes: they must not pin the batch (or H, W) to the
    example's, nor refuse batch 0."""
    generator = torch.Generator().manual_seed(11)
    block = randomize_bn_(BasicBlock(8, 8).eval(), generator)
    fused = fr.fuse(block, backend="torch")
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    program = torch.export.export(
        fused, (torch.randn(2, 8, 6, 5),), dynamic_shapes=({0: batch, 2: height, 3: width},)
    )
    for n, h, w in ((0, 6, 5), (1, 4, 7), (5, 1, 1)):
        x = torch.randn(n, 8, h, w, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), block(x), rtol=1e-5, atol=1e-5)


# Backend selection ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda", "cudnn"])
def test_gpu_backend_on_cpu_tensors_is_an_error(name):
    """Asked for by name, a backend that cannot run on the tensors' device is an error, not a fallback."""
    x, weight, bias, _ = conv_inputs(1, 8, 3, 3, 8, 1, generator=torch.Generator().manual_seed(12))
    x, weight, bias = x.cpu(), weight.cpu(), bias.cpu()
    with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run on cpu tensors: .*CUDA"):
        ops.conv2d_bias_act(x, weight, bias, backend=name)
    with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run on cpu tensors"):
        ops.add_relu(x, x, backend=name)


def test_add_relu_unsupported_case_falls_back_with_one_warning(monkeypatch, fallback_allowed):
    triton = backends.get("triton")
    monkeypatch.setattr(triton, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton, "add_relu_unsupported_reason", lambda x, y: "a made-up limitation")
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.warns(UserWarning, match="'triton' does not support this add_relu.*a made-up limitation"):
        out = ops.add_relu(x, y, backend="triton")
    assert torch.equal(out, (x + y).relu())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.add_relu(x, y, backend="triton")


# Concurrency ------------------------------------------------------------------------------------


def _workload(device: str, seed: int = 13, dtype: torch.dtype = torch.float32):
    """A few different conv and add_relu calls (each a function of the backend name)."""
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for n, c, hw, cout, kernel, stride in ((2, 8, 6, 8, 3, 1), (1, 16, 5, 8, 1, 2), (3, 8, 4, 16, 3, 2)):
        x, weight, bias, _ = conv_inputs(n, c, hw, hw, cout, kernel, generator=generator, dtype=dtype)
        x, weight, bias = (t.to(device) for t in (x, weight, bias))
        conv = dict(stride=stride, padding=kernel // 2)
        calls.append(lambda name, a=(x, weight, bias), kw=conv: ops.conv2d_bias_act(*a, backend=name, **kw))
    y = torch.randn(2, 8, 5, 5, generator=generator).to(device, dtype)
    calls.append(lambda name: ops.add_relu(y, y.flip(0), backend=name))
    return calls


def _run_in_threads(calls, name: str, threads: int = 8, rounds: int = 4):
    """Runs every call `rounds` times from each of `threads` threads at once, in shuffled orders."""
    results, errors = [], []
    barrier = threading.Barrier(threads)

    def worker(seed):
        order = [i for i in range(len(calls)) for _ in range(rounds)]
        random.Random(seed).shuffle(order)
        try:
            barrier.wait()
            results.extend((i, calls[i](name)) for i in order)
        except Exception as error:  # noqa: BLE001 (reported by the test)
            errors.append(error)

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    return results


# Triton's interpreter swaps globals of triton.language while a kernel runs, so two CPU threads
# interpreting kernels at once break each other; on a GPU, Triton kernels run from any thread.
THREADED_BACKENDS = [*BACKENDS, "auto"] if torch.cuda.is_available() else ["torch", "auto"]


@pytest.mark.parametrize("name", THREADED_BACKENDS)
def test_concurrent_calls_equal_serial_calls(name):
    calls = _workload(DEVICE, dtype=served_dtype(name))
    serial = [call(name) for call in calls]
    with dispatch.record_serving(all_threads=True) as served:
        results = _run_in_threads(calls, name)
    assert len(served) == len(results) and (name == "auto" or set(served) == {name}), set(served)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert len(results) == 8 * 4 * len(calls)
    for i, out in results:
        assert torch.equal(out, serial[i]), f"call {i} differs from its serial result"


def test_fallback_warns_once_under_concurrent_callers(monkeypatch, fallback_allowed):
    threads = 8

    class RacingSet(set):
        """Answers each "warned already?" only once every thread has asked: without a lock, they
        all hear no, and all warn."""

        def __init__(self):
            super().__init__()
            self.asked, self.everyone_asked, self.count_lock = 0, threading.Event(), threading.Lock()

        def __contains__(self, key):
            answer = super().__contains__(key)
            with self.count_lock:
                self.asked += 1
                if self.asked >= threads:
                    self.everyone_asked.set()
            self.everyone_asked.wait(timeout=5)
            return answer

    triton = backends.get("triton")
    monkeypatch.setattr(triton, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton, "conv_unsupported_reason", lambda *args: "a limitation seen by many threads")
    monkeypatch.setattr(dispatch, "_warned", RacingSet())
    x, weight, bias, _ = conv_inputs(1, 8, 3, 3, 8, 1, generator=torch.Generator().manual_seed(14))
    x, weight, bias = x.cpu(), weight.cpu(), bias.cpu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call = [lambda name: ops.conv2d_bias_act(x, weight, bias, backend=name)]
        _run_in_threads(call, "triton", threads=threads, rounds=1)
    ours = [w for w in caught if "a limitation seen by many threads" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]


def test_first_use_of_a_backend_from_many_threads(monkeypatch):
    monkeypatch.setattr(backends, "_loaded", {})
    names = list(backends.NAMES) * 4
    got = [None] * len(names)
    barrier = threading.Barrier(len(names))

    def load(i):
        barrier.wait()
        got[i] = backends.get(names[i])

    pool = [threading.Thread(target=load, args=(i,)) for i in range(len(names))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for name, module in zip(names, got):
        assert module is importlib.import_module(backends.entry(name).module) is backends._loaded[name]


# GPU only ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_side_stream_equals_default_stream_gpu(backend):
    """The kernels run on the caller's current stream: inputs written on a side stream just before
    the call (behind a long-running kernel) must be what the conv reads."""
    generator = torch.Generator().manual_seed(15)
    x, weight, bias, residual = conv_inputs(
        4, 64, 28, 28, 64, 3, generator=generator, dtype=torch.float16, residual_shape=(4, 64, 28, 28)
    )
    x = x.contiguous(memory_format=torch.channels_last)
    # cuDNN has no add + ReLU: the reference computes it for that backend
    add_backend = "torch" if backends.get(backend).add_relu_unsupported_reason(x, residual) else backend
    expected_conv = ops.conv2d_bias_act(x, weight, bias, residual, padding=1, backend=backend)
    expected_add = ops.add_relu(x, residual, backend=add_backend)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy, so a kernel on another stream runs first
        x_side, residual_side = x * 1, residual * 1
        out_conv = ops.conv2d_bias_act(x_side, weight, bias, residual_side, padding=1, backend=backend)
        out_add = ops.add_relu(x_side, residual_side, backend=add_backend)
    side.synchronize()
    assert torch.equal(out_conv, expected_conv)
    assert torch.equal(out_add, expected_add)


def _big_fp16(shape, generator_seed):
    torch.cuda.manual_seed(generator_seed)
    return torch.empty(shape, dtype=torch.float16, device="cuda", memory_format=torch.channels_last).normal_()


# 33 images of 64 x 1024 x 1024: 2.2e9 elements (4.4 GB in fp16); image 32 starts at element 2**31.
_BIG = (33, 64, 1024, 1024)


def _needs_free_memory(gib: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


# The CUDA C++ kernels index with 32-bit offsets and refuse operands over 2 GiB (a fallback
# test_cuda_extension.py checks); the reference is eager PyTorch itself.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b not in ("cuda", "torch")])
def test_conv_over_2_31_elements_gpu(poisoned_outputs, backend, monkeypatch, served_by):
    """A 1x1 conv whose input, residual and output each hold more than 2**31 elements: the images past
    element 2**31 must be right (64-bit offsets), and every element must be written."""
    _needs_free_memory(24)
    x, residual = _big_fp16(_BIG, 16), _big_fp16(_BIG, 17)
    assert x.numel() > 2**31
    weight = torch.randn(64, 64, 1, 1, device="cuda", dtype=torch.float16) / 8
    bias = torch.randn(64, device="cuda", dtype=torch.float16)
    with served_by(backend):
        out = ops.conv2d_bias_act(x, weight, bias, residual, backend=backend)
    assert not out.isnan().any(), "elements of the output were left unwritten"
    for images in (slice(0, 1), slice(31, 33)):
        args = (x[images], weight, bias, residual[images])
        result = parity(out[images], eager_conv(*args), eager_conv(*args, dtype=torch.float64))
        assert result.ok, f"images {images}: {result}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b not in ("cudnn", "torch")])
def test_add_relu_over_2_31_elements_gpu(poisoned_outputs, backend, monkeypatch, served_by):
    _needs_free_memory(16)
    x, y = _big_fp16(_BIG, 18), _big_fp16(_BIG, 19)
    with served_by(backend):
        out = ops.add_relu(x, y, backend=backend)
    assert not out.isnan().any(), "elements of the output were left unwritten"
    for images in (slice(0, 1), slice(31, 33)):
        assert torch.equal(out[images], (x[images] + y[images]).relu())
