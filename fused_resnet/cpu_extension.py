"""The CPU C++ extension's operators (fused_resnet._cpu, built from csrc/cpu/), where it was built."""

from __future__ import annotations

import functools

import torch


@functools.cache
def ops():
    """torch.ops.fused_resnet_cpu, or None where the CPU extension was not built (FUSED_RESNET_SKIP_CPU_BUILD=1,
    or a source tree never built): then ATen's ops serve instead."""
    try:
        from fused_resnet import _cpu  # noqa: F401  (loading it registers the fused_resnet_cpu ops)
    except ImportError:
        return None
    return torch.ops.fused_resnet_cpu
