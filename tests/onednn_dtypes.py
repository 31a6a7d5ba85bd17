"""For the tests that give the oneDNN backend bfloat16 or float16: what oneDNN has depends on the CPU
and on ONEDNN_MAX_CPU_ISA (an AVX2 machine has neither), so a test asks the backend, and where the
dtype is missing checks what the backend documents for a case it does not serve, instead of failing
or leaving the case out."""

from __future__ import annotations

import re

import pytest
import torch

from fused_resnet import backends, cpu_isa


def onednn_reason(dtype: torch.dtype) -> str | None:
    """Why the oneDNN backend does not serve `dtype` convolutions here (None: it does)."""
    return backends.get("onednn").conv_unsupported_reason(torch.empty(0, dtype=dtype), *[None] * 7)


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
    monkeypatch.setattr(backends, "STRICT", True)
    with pytest.raises(RuntimeError, match=re.escape(reason) + ".*FUSED_RESNET_STRICT=1 forbids falling back"):
        call()
    request.getfixturevalue("fallback_allowed")
    with pytest.warns(UserWarning, match=re.escape(reason)), backends.record_serving() as served_by:
        out = call()
    assert served_by and set(served_by) == {"torch"}, served_by
    return out
