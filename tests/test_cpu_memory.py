"""Freed activation memory kept for reuse (fused_resnet/cpu_memory.py): after a fused conv ran on oneDNN, a
large block freed and allocated again is served from memory the process kept, without page faults;
with the opt-out, the environment's own thresholds, or another C library, glibc's policy is left alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fused_resnet import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Runs a fused conv (served by oneDNN) unless told not to; then, six times, takes three 30 MiB blocks from
# malloc (what PyTorch's CPU allocator calls), writes them and frees them, counting the page faults of
# each round (the three blocks are 23,040 pages). Through ctypes, so that no small allocation lands
# above them in the heap. glibc's own policy maps the first round afresh, and then trims the heap of
# the freed blocks every round (90 MiB at its top pass its trim threshold, twice the largest block
# freed): every round is new pages. Kept, only the first round is.
_PROBE = """
import ctypes, json, resource, sys, torch
from torch import nn
import fused_resnet as fr
from fused_resnet import cpu_memory, dispatch
if sys.argv[1] == "conv":
    conv = fr.FusedConv2d.from_conv_bn(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), relu=True)
    with torch.no_grad(), dispatch.record_serving() as served:
        conv(torch.randn(2, 3, 16, 16))
    assert served == ["onednn"], served
libc = ctypes.CDLL("libc.so.6")
malloc, free, memset = libc.malloc, libc.free, ctypes.memset
malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
getrusage, RUSAGE_SELF, size = resource.getrusage, resource.RUSAGE_SELF, 30 << 20
faults = []
for _ in range(6):
    before = getrusage(RUSAGE_SELF).ru_minflt
    blocks = [malloc(size) for _ in range(3)]
    for block in blocks:
        memset(block, 1, size)
    for block in blocks:
        free(block)
    faults.append(getrusage(RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": cpu_memory.state(), "faults": faults}))
"""


def _probe(mode: str, **environ) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES" and k != cpu_memory.OPT_OUT}
    env.update(environ)
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_a_fused_conv_keeps_freed_memory_for_the_next_allocation():
    kept = _probe("conv")
    assert kept["state"] == "set"
    assert max(kept["faults"][1:]) < 1000, kept  # the later rounds reuse the first round's pages
    # Without the setting, every round is new pages: what the setting saves, and what the test depends on.
    fresh = _probe("no-conv")
    assert fresh["state"] is None
    assert min(fresh["faults"]) > 20000, fresh


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
@pytest.mark.parametrize(
    "environ, reason",
    [
        ({cpu_memory.OPT_OUT: "system"}, "left as glibc sets it: FUSED_RESNET_CPU_MALLOC=system"),
        ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, "left as it is: the environment sets glibc's malloc thresholds"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, "left as it is: the environment sets glibc's malloc thresholds"),
    ],
)
def test_the_opt_out_and_the_environments_thresholds_are_left_alone(environ, reason):
    result = _probe("conv", **environ)
    assert result["state"] == reason, result
    assert min(result["faults"]) > 20000, result  # new pages every round, as without fused_resnet


def test_another_c_library_is_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_state", None)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("musl", "1.2"))
    monkeypatch.delenv(cpu_memory.OPT_OUT, raising=False)
    assert cpu_memory.keep_freed_memory() == "left as it is: the C library is not glibc"
    assert cpu_memory.state() == "left as it is: the C library is not glibc"
