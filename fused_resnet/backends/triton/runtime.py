"""Where Triton's kernels run: on a GPU, or on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device_of(t: torch.Tensor):
    """Makes t's GPU the current device for a launch: Triton launches on the current device's
    stream, so a tensor on another GPU than the current one would be read on the wrong device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
