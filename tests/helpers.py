"""What the tests share: eager PyTorch's conv + bias (+ residual) (+ ReLU), the float64 reference of the
parity rule (fused_resnet.parity), the assertion of that rule, and what a test of a oneDNN dtype does
where the CPU lacks it.

oneDNN's bfloat16 and float16 depend on the CPU and on ONEDNN_MAX_CPU_ISA (an AVX2 machine has
neither), so a test asks the backend, and where the dtype is missing checks what the backend documents
for a case it does not serve, instead of failing or leaving the case out."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_resnet as fr
from fused_resnet import backends, cpu_isa, dispatch
from fused_resnet.call import ConvCall
from fused_resnet.parity import parity


def eager_conv(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1, relu=True,
               *, scale=None, shift=None, dtype=None):
    """act(F.conv2d(x, weight, bias) + residual) by unfused eager PyTorch, every tensor cast to `dtype` first
    (default: as they are). With `scale` and `shift`, conv2d_preact's (y, z): y without the activation and
    z = relu(y * scale + shift) per channel."""

    def cast(t):
        return None if t is None else t.detach().to(dtype or x.dtype)

    y = F.conv2d(cast(x), cast(weight), cast(bias), stride, padding, dilation, groups)
    if residual is not None:
        y = y + cast(residual)
    if scale is not None:
        return y, torch.relu(y * cast(scale)[:, None, None] + cast(shift)[:, None, None])
    return y.relu() if relu else y


def reference_conv(*args, **kwargs):
    """eager_conv in float64: the reference of the parity rule."""
    return eager_conv(*args, dtype=torch.float64, **kwargs)


def assert_parity(out, *args, **kwargs):
    """`out`, our result for eager_conv(*args, **kwargs), passes the parity rule: its error against float64 is
    at most twice eager PyTorch's in out's dtype, plus a floor."""
    result = parity(out, eager_conv(*args, dtype=out.dtype, **kwargs), reference_conv(*args, **kwargs))
    assert result.ok, str(result)


def cpu_extension_ops():
    """torch.ops.fused_resnet_cpu, or a skip where the extension is not built (tests/test_build.py fails then,
    unless FUSED_RESNET_SKIP_CPU_BUILD=1 says it is meant)."""
    from fused_resnet import cpu_extension

    ops = cpu_extension.ops()
    if ops is None:
        pytest.skip("the CPU extension is not built (FUSED_RESNET_SKIP_CPU_BUILD=1)")
    return ops


def onednn_reason(dtype: torch.dtype) -> str | None:
    """Why the oneDNN backend does not serve `dtype` convolutions here (None: it does)."""
    return backends.get("onednn").conv_unsupported_reason(ConvCall.of(torch.empty(0, dtype=dtype), None))


def run_on_onednn(call, dtype: torch.dtype, request, served):
    """call(), which computes `dtype` convolutions with backend="onednn", and its result.

    Where oneDNN serves `dtype` here, it runs inside `served` (a context manager that checks oneDNN
    computed it). Where it does not, the test checks the documented refusal instead: under
    FUSED_RESNET_STRICT=1 a RuntimeError naming cpu_isa's reason (which names the ISA); with the
    fallback allowed one warning naming it, and the reference computing every op. That result is
    returned, so that the test's own checks of the numbers still run.
    """
    reason = onednn_reason(dtype)
    if reason is None:
        with served:
            return call()
    assert reason == cpu_isa.missing_reason(dtype) and cpu_isa.onednn_isa() in reason
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(dispatch, "STRICT", True)
    with pytest.raises(RuntimeError, match=re.escape(reason) + ".*FUSED_RESNET_STRICT=1 forbids falling back"):
        call()
    request.getfixturevalue("fallback_allowed")
    with pytest.warns(UserWarning, match=re.escape(reason)), dispatch.record_serving() as served_by:
        out = call()
    assert served_by and set(served_by) == {"torch"}, served_by
    return out


def fuse_quietly(model, **kwargs):
    """fr.fuse without its warning of the layers left unfused (a test checks fr.inspect instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fr.fuse(model, **kwargs)


def named_tensors(value, prefix="out") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model's output (a tensor, or dicts, lists and tuples of them), each with its place."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [item for k in value for item in named_tensors(value[k], f"{prefix}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in named_tensors(v, f"{prefix}[{i}]")]
    return []


@torch.no_grad()
def assert_same_function(model, fused, *inputs):
    """Parity with eager (fp32, float64 reference), output by output, memory formats included."""
    eager, ours = model(*inputs), fused(*inputs)
    exact = copy.deepcopy(model).double()(*(t.double() if isinstance(t, torch.Tensor) else t for t in inputs))
    assert len(named_tensors(ours)) == len(named_tensors(eager))
    for (name, e), (_, o), (_, x) in zip(named_tensors(eager), named_tensors(ours), named_tensors(exact)):
        assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} vs eager's {tuple(e.shape)}"
        for layout in (torch.contiguous_format, torch.channels_last):
            assert o.is_contiguous(memory_format=layout) == e.is_contiguous(memory_format=layout), (
                f"{name}: {layout} {o.is_contiguous(memory_format=layout)} vs eager's {e.is_contiguous(memory_format=layout)}"
            )
        result = parity(o, e, x)
        assert result.ok, f"{name}: {result}"
    return eager, ours
