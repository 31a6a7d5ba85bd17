"""Freed activation memory kept for reuse on the CPU, so that a forward pass does not fault its pages in afresh.

PyTorch's CPU tensors come from the C library's malloc. glibc's serves a block above its mmap threshold
with a mapping of its own, unmapped when freed, and hands the free top of its heap back to the OS once
it exceeds its trim threshold (both thresholds grow with the blocks seen, to 32 and 64 MiB at most). A
forward pass that frees and allocates activations of tens of MiB then writes each one into new pages,
which the kernel zeroes on first touch, 4 KiB at a time. Whether it happens depends on how the heap
happens to be laid out: ResNet-50 at batch 8 (2 threads, AVX512-BF16) took 12,500-14,000 page faults per
forward in some processes (263-303 ms a forward) and almost none in others (199-205 ms). Inference
engines avoid it with arenas of their own (ONNX Runtime, OpenVINO).

On the first call of a fused conv that oneDNN serves (backends/onednn.py), `keep_freed_memory` raises both thresholds
(mallopt): blocks up to 32 MiB (the most glibc lets come from its heap) are served from the heap from the
first one on, and up to 1 GiB of freed memory stays in the process for the next call, as an arena would
keep it. The setting is the process's: every allocation in it is
served so from then on. It is left as it is where the C library is not glibc, where the environment
already sets either threshold (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES's
glibc.malloc.mmap_threshold / trim_threshold), and where FUSED_RESNET_CPU_MALLOC=system asks for glibc's own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 32 << 20  # bytes: glibc's ceiling (HEAP_MAX_SIZE / 2); larger blocks keep mappings of their own
TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the heap's top kept in the process
OPT_OUT = "FUSED_RESNET_CPU_MALLOC"  # "system": glibc's own thresholds
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

_state: str | None = None  # what keep_freed_memory did, once it ran


def keep_freed_memory() -> str:
    """Raises glibc's malloc thresholds once per process (see the module docstring); later calls cost a
    lookup. Returns what was done: "set", or why not."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return f"left as glibc sets it: {OPT_OUT}=system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left as it is: the C library is not glibc"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or any(
        name in tunables for name in ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
    ):
        return "left as it is: the environment sets glibc's malloc thresholds"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left as it is: glibc's mallopt was not found"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Setting either one also stops glibc from adapting the other: both are set.
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1 or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "left as it is: glibc refused the thresholds"
    return "set"


def state() -> str | None:
    """What keep_freed_memory did in this process (None: it has not run)."""
    return _state
