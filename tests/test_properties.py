"""Property-based tests: conv2d_bias_act against a float64 reference over random valid configurations
(batch, channels, size, kernel, stride, padding, dilation, groups, bias / residual / ReLU, layouts,
dtype), under the numerical parity rule.

Hypothesis profile, picked here: "cpu" (no GPU: bounded examples, so CI stays quick) or "gpu"
(more examples, every backend). FUSED_RESNET_HYPOTHESIS_PROFILE overrides the choice.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from helpers import eager_conv
from test_reliability import VIEWS, as_view

from fused_resnet import backends, dispatch, ops
from fused_resnet.call import ConvCall
from fused_resnet.backends import triton as triton_backend
from fused_resnet.parity import parity

HAS_CUDA = torch.cuda.is_available()

settings.register_profile(
    "cpu", max_examples=60, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "gpu", max_examples=300, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("FUSED_RESNET_HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "cpu"))

# Triton compiles (on a GPU: and autotunes) a kernel for each new kind of case, and its interpreter
# runs every program in Python: it gets a quarter of the examples (a twentieth on a GPU), tiny sizes.
TRITON_EXAMPLES = max(1, settings.default.max_examples // (20 if HAS_CUDA else 4))


@st.composite
def conv_cases(draw, *, max_batch, channels, max_size, kernels, max_groups, dtypes, device):
    """A valid conv2d_bias_act call on random data: (x, weight, bias, residual, conv arguments)."""
    groups = draw(st.integers(1, max_groups))
    cin = groups * draw(st.sampled_from(channels))
    cout = groups * draw(st.sampled_from(channels))
    kernel = (draw(st.sampled_from(kernels)), draw(st.sampled_from(kernels)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, (k - 1) * d // 2 + 1)) for k, d in zip(kernel, dilation))
    # The padded input must hold the dilated kernel at least once.
    least = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding)]
    h, w = (draw(st.integers(lo, max(lo, max_size))) for lo in least)
    n = draw(st.integers(1, max_batch))  # batch 0 returns before any kernel: test_empty_batch covers it
    dtype = draw(st.sampled_from(dtypes))
    x_view, residual_view = draw(st.sampled_from(VIEWS)), draw(st.sampled_from(VIEWS))
    weight_view = draw(st.sampled_from(["nchw", "channels_last", "transposed"]))
    has_bias, has_residual, relu = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    x = as_view(randn(n, cin, h, w), x_view)
    fan_in = cin // groups * kernel[0] * kernel[1]
    weight = as_view(randn(cout, cin // groups, *kernel, scale=fan_in**-0.5), weight_view)
    bias = randn(cout) if has_bias else None
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    residual = as_view(randn(n, cout, oh, ow), residual_view) if has_residual else None
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    note(
        f"x {tuple(x.shape)} {x_view}, weight {tuple(weight.shape)} {weight_view}, bias {has_bias}, "
        f"residual {has_residual} {residual_view}, {conv}, {dtype}"
    )
    return x, weight, bias, residual, conv


def check(case, backend):
    x, weight, bias, residual, conv = case
    with dispatch.record_serving() as served:
        out = ops.conv2d_bias_act(x, weight, bias, residual, backend=backend, **conv)
    assert served == [backend], f"computed by {served}, not by {backend!r}"
    expected = eager_conv(x, weight, bias, residual, **conv)
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    result = parity(out, expected, eager_conv(x, weight, bias, residual, dtype=torch.float64, **conv))
    assert result.ok, str(result)


def unsupported_reason(backend: str, case) -> str | None:
    x, weight, bias, residual, conv = case
    return backends.get(backend).conv_unsupported_reason(ConvCall.of(x, weight, bias, residual, **conv))


LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, test_every_backend_matches_float64_gpu covers Triton")
@pytest.mark.skipif(
    triton_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason="Triton's interpreter is not enabled (TRITON_INTERPRET=1 before triton is imported)",
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the interpreter
@settings(max_examples=TRITON_EXAMPLES)
@given(
    conv_cases(
        max_batch=2, channels=[1, 3, 4], max_size=6, kernels=[1, 2, 3], max_groups=2,
        dtypes=LOW_PRECISION, device="cpu",
    )
)
def test_triton_interpreter_matches_float64(case):
    assert unsupported_reason("triton", case) is None  # Triton computes every case drawn here itself
    check(case, "triton")


ONEDNN = backends.get("onednn")
ONEDNN_DTYPES = [d for d in LOW_PRECISION if ONEDNN.conv_unsupported_reason(ConvCall.of(torch.empty(0, dtype=d), None)) is None]


@pytest.mark.skipif(ONEDNN.unavailable_reason(torch.device("cpu")) is not None, reason="PyTorch built without oneDNN")
@given(
    conv_cases(
        max_batch=3, channels=[1, 2, 3, 5, 8], max_size=9, kernels=[1, 2, 3, 5], max_groups=3,
        dtypes=ONEDNN_DTYPES, device="cpu",
    )
)
def test_onednn_matches_float64(case):
    assert unsupported_reason("onednn", case) is None  # oneDNN computes every case drawn here itself
    with dispatch.record_serving() as served:
        check(case, "onednn")
    assert served.count("onednn") == (case[0].shape[0] > 0)  # an empty batch never reaches a backend



# The reference computes with eager PyTorch's ops: comparing it with eager proves nothing.
GPU_BACKENDS = [b for b in (backends.available("cuda") if HAS_CUDA else backends.NAMES) if b not in ("torch", "onednn")]
GPU_CASES = dict(
    max_batch=4, channels=[1, 3, 8, 16, 24, 40, 64], max_size=20, kernels=[1, 3, 5, 7], max_groups=4,
    dtypes=LOW_PRECISION, device="cuda",
)
# What the CUDA C++ kernels serve: float16 and bfloat16, ungrouped, output channels a multiple of 8.
GPU_CASES_SERVED_BY = {"cuda": dict(channels=[8, 16, 24, 40, 64], max_groups=1, dtypes=LOW_PRECISION[1:])}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_every_backend_matches_float64_gpu(backend, monkeypatch):
    # Eager cuDNN uses TF32 for some small fp32 cases and not for others: compare in full fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cases = conv_cases(**{**GPU_CASES, **GPU_CASES_SERVED_BY.get(backend, {})})

    @settings(max_examples=TRITON_EXAMPLES if backend == "triton" else settings.default.max_examples)
    @given(cases)
    def matches(case):
        assert unsupported_reason(backend, case) is None  # drawn from what the backend serves
        check(case, backend)

    matches()
