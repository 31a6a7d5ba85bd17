"""fused_resnet.cpu_isa: the instruction-set level oneDNN runs at, under its ONEDNN_MAX_CPU_ISA cap,
checked against oneDNN itself (its verbose output and torch's questions to it) on this machine, and
the warning fr.fuse gives for a dtype the CPU computes slower than float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fused_resnet as fr
from fused_resnet import cpu_isa

X86 = cpu_isa.level(environ={}) is not None
LEVELS = {level.name: level for level in cpu_isa.LEVELS}

# CPUs as torch.cpu.get_capabilities() describes them (the features that matter here).
AVX2_EPYC = LEVELS["AVX2"].features | {"fma3"}  # AMD EPYC Rome: AVX2 only
ZEN4 = LEVELS["AVX512-BF16"].features | {"avx_vnni", "avx512_vbmi"}  # AMD EPYC Genoa
SAPPHIRE_RAPIDS = LEVELS["AMX"].features
SIERRA_FOREST = LEVELS["AVX2-VNNI-2"].features  # AVX-NE-CONVERT without AVX-512


@pytest.mark.parametrize(
    "features, environ, expected",
    [
        (AVX2_EPYC, {}, "AVX2"),
        (AVX2_EPYC, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX2"),  # a cap never raises the level
        (ZEN4, {}, "AVX512-BF16"),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2"),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "AVX-512"),  # oneDNN reads the value in any case
        (ZEN4, {"DNNL_MAX_CPU_ISA": "AVX2"}, "AVX2"),  # the older name
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"}, "AVX-512"),  # the new name wins
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "", "DNNL_MAX_CPU_ISA": "AVX2"}, "AVX2"),  # empty is unset
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "AVX512-BF16"),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX3"}, "AVX512-BF16"),  # a value oneDNN does not know caps nothing
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, "AVX2-VNNI"),  # the CPU lacks AVX-NE-CONVERT
        (SAPPHIRE_RAPIDS, {}, "AMX"),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_FP16"}, "AVX512-FP16"),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX512-BF16"),
        (SIERRA_FOREST, {}, "AVX2-VNNI-2"),
        (SIERRA_FOREST, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "AVX2"),  # AVX2_VNNI is not below AVX512_CORE
        (frozenset({"neon", "sve"}), {}, None),  # not x86-64
    ],
)
def test_level_of_a_cpu_under_a_cap(features, environ, expected):
    level = cpu_isa.level(frozenset(features), environ)
    assert (level and level.name) == expected


@pytest.mark.skipif(not X86, reason="oneDNN's ISA levels are x86-64's")
def test_agrees_with_onednn_in_this_process():
    """torch asks oneDNN whether it has bfloat16 and float16 convolutions at the level it runs at:
    cpu_isa must give the same answers, here and in CI's run under ONEDNN_MAX_CPU_ISA=AVX2."""
    assert cpu_isa.onednn_computes(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_isa.onednn_computes(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()


# The ISA line of ONEDNN_VERBOSE=1 for the levels a cap of AVX512_CORE_BF16 or below can give.
ONEDNN_DESCRIPTIONS = {
    "SSE4.1": "Intel SSE4.1",
    "AVX": "Intel AVX",
    "AVX2": "Intel AVX2",
    "AVX2-VNNI": "Intel AVX2 with Intel DL Boost",
    "AVX-512": "Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions",
    "AVX512-VNNI": "Intel AVX-512 with Intel DL Boost",
    "AVX512-BF16": "Intel AVX-512 with Intel DL Boost and bfloat16 support",
}
# cpu_isa loaded alone, without the package (and torchvision): a fresh process per cap costs less.
_PROBE = f"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("cpu_isa", {cpu_isa.__file__!r})
cpu_isa = sys.modules["cpu_isa"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_isa)
x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
torch.ops.mkldnn._convolution_pointwise(x, torch.randn(8, 8, 1, 1), None, [0, 0], [1, 1], [1, 1], 1, "none", [None], "")
print(json.dumps(dict(
    isa=cpu_isa.onednn_isa(), describe=cpu_isa.describe(),
    bf16=[cpu_isa.onednn_computes(torch.bfloat16), torch.ops.mkldnn._is_mkldnn_bf16_supported()],
    fp16=[cpu_isa.onednn_computes(torch.float16), torch.ops.mkldnn._is_mkldnn_fp16_supported()],
)))
"""


@pytest.mark.skipif(not X86, reason="oneDNN's ISA levels are x86-64's")
@pytest.mark.parametrize(
    "cap",
    [
        {"ONEDNN_MAX_CPU_ISA": "AVX2"},
        {"ONEDNN_MAX_CPU_ISA": "avx512_core"},
        {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"},
        {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"},
    ],
    ids=lambda cap: " ".join(f"{k}={v}" for k, v in cap.items()),
)
def test_agrees_with_onednn_under_a_cap(cap):
    """In a fresh process (oneDNN reads the cap once): the level is the one oneDNN's verbose output
    names, and the bfloat16 and float16 answers are torch's."""
    environ = {k: v for k, v in os.environ.items() if k not in cpu_isa.CAP_VARIABLES}
    environ.update(cap, ONEDNN_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", _PROBE], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    isa_lines = [line.split("isa:", 1)[1] for line in done.stdout.splitlines() if line.startswith("onednn_verbose") and ",isa:" in line]
    result = json.loads(done.stdout.splitlines()[-1])
    assert isa_lines == [ONEDNN_DESCRIPTIONS[result["isa"]]], (isa_lines, result)
    assert result["bf16"][0] == result["bf16"][1] and result["fp16"][0] == result["fp16"][1], result
    capped, uncapped = cpu_isa.level(environ=cap).name, cpu_isa.level(environ={}).name
    assert result["isa"] == capped
    variable, value = cpu_isa.cap_setting(cap)
    assert result["describe"] == (capped if capped == uncapped else f"{capped} ({variable}={value} on an {uncapped} CPU)")


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()


def _fuse_warnings(model, dtype) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fr.fuse(model, dtype=dtype)
    return [str(w.message) for w in caught if "slower than float32" in str(w.message)]


@pytest.fixture
def at_level(monkeypatch):
    """at_level("AVX2", features): cpu_isa answers as on a CPU with `features` whose oneDNN runs at that level."""

    def set_level(name):
        monkeypatch.setattr(cpu_isa, "_level_here", lambda: LEVELS[name])
        monkeypatch.setattr(cpu_isa, "cap_setting", lambda environ=None: None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return set_level


@pytest.mark.parametrize(
    "level, dtype, expected",
    [
        ("AVX2", torch.bfloat16, "oneDNN has no bfloat16 convolution at AVX2: it needs AVX-512"),
        ("AVX2", torch.float16, "oneDNN has no float16 convolution at AVX2: it needs AVX512-FP16"),
        ("AVX-512", torch.bfloat16, "oneDNN emulates bfloat16 arithmetic at AVX-512, which has no bfloat16 instructions"),
        ("AVX512-VNNI", torch.bfloat16, "oneDNN emulates bfloat16 arithmetic at AVX512-VNNI"),
        ("AVX512-BF16", torch.float16, "oneDNN has no float16 convolution at AVX512-BF16"),
        ("AVX512-BF16", torch.bfloat16, None),
        ("AMX", torch.bfloat16, None),
        ("AMX", torch.float16, None),
        ("AVX2-VNNI-2", torch.bfloat16, None),
        ("AVX2", torch.float32, None),
    ],
)
def test_fuse_warns_once_where_the_dtype_is_slower_than_float32(level, dtype, expected, at_level):
    at_level(level)
    caught = _fuse_warnings(_conv_bn(), dtype)
    if expected is None:
        assert caught == []
    else:
        name = str(dtype).removeprefix("torch.")
        assert len(caught) == 1 and caught[0].startswith(f"fused_resnet.fuse: {name} computes slower than float32 on this CPU, so float32 is faster here: ")
        assert expected in caught[0]


def test_fuse_warns_for_a_model_already_in_that_dtype(at_level):
    at_level("AVX2")
    assert len(_fuse_warnings(_conv_bn().to(torch.bfloat16), None)) == 1
    assert _fuse_warnings(_conv_bn().to(torch.bfloat16), torch.float32) == []


def test_fuse_does_not_warn_where_a_gpu_may_run_the_model(at_level, monkeypatch):
    at_level("AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _fuse_warnings(_conv_bn(), torch.bfloat16) == []


@pytest.mark.skipif(not X86, reason="oneDNN's ISA levels are x86-64's")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, fr.fuse leaves the CPU's speed alone")
def test_fuse_warns_here_as_oneDNN_runs():
    """Unpatched: on this CPU under its cap (CI also runs this under ONEDNN_MAX_CPU_ISA=AVX2), bfloat16
    warns exactly where oneDNN has no bfloat16 convolution or no bfloat16 instructions."""
    features = LEVELS[cpu_isa.onednn_isa()].features
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and bool({"avx512_bf16", "avx_ne_convert"} & features)
    caught = _fuse_warnings(_conv_bn(), torch.bfloat16)
    assert len(caught) == (0 if native else 1)
    if caught:
        assert cpu_isa.onednn_isa() in caught[0]
