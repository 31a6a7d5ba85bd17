"""The instruction set oneDNN computes with on this CPU, and what it means for each dtype.

oneDNN picks its kernels for the newest instruction-set level the CPU has, unless the environment
caps it: ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA; the new name wins when both are set)
names the highest level it may use, e.g. AVX2, AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX, ALL.
oneDNN reads the variable once, at its first use, so it must be set before torch runs a convolution
(in practice: before torch is imported). Its levels are sets of CPU features, partially ordered by
inclusion; a level is usable when the CPU has all its features and the cap's level includes them
all, and oneDNN takes the newest usable one, AVX-512 levels before AVX2_VNNI_2. This module mirrors
that rule, so that the backend, fr.fuse and the benchmarks can say which level a CPU runs at.

What each level does with bfloat16 and float16 convolutions (oneDNN 3.12 in torch 2.14; times of one
call each on a busy 2-core AMD EPYC with AVX512-BF16, capped to each level, so rough):
- below AVX-512 (and without AVX-NE-CONVERT) oneDNN has neither: torch refuses to prepack their
  weights, and eager PyTorch computes them with ATen's generic kernels, several times slower than
  float32 (one 3x3 conv, 64 channels, 8x56x56, AVX2 cap: 48 ms float32, 204 ms bfloat16, 200 ms float16);
- AVX-512 without AVX512-BF16 computes bfloat16 with emulated dot products ("jit_bf16:avx512_core"),
  about half as fast as float32 there (same conv: 24 ms float32, 50 ms bfloat16);
- AVX512-BF16 and AMX have bfloat16 instructions: faster than float32 (same conv: 14 ms bfloat16);
- float16 needs AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT (AVX2-VNNI-2 level), which convert in hardware.
  (AVX2-VNNI-2, AVX512-FP16 and AMX were not measured: those CPUs were not at hand.)
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# The environment variables that cap oneDNN's level, in the order oneDNN reads them.
CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass(frozen=True)
class Level:
    name: str  # as fused_resnet prints it
    cap: str  # oneDNN's name, the ONEDNN_MAX_CPU_ISA value that stops at this level
    features: frozenset  # torch.cpu.get_capabilities() keys it needs, those of the levels it includes too


def _levels() -> tuple[Level, ...]:
    sse41 = frozenset({"sse4_1"})
    avx = sse41 | {"avx"}
    avx2 = avx | {"avx2"}
    avx2_vnni = avx2 | {"avx_vnni"}
    avx512 = avx2 | {"avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"}
    avx512_bf16 = avx512 | {"avx512_vnni", "avx512_bf16"}
    avx512_fp16 = avx512_bf16 | avx2_vnni | {"avx512_fp16"}
    amx = avx512_fp16 | {"amx_tile", "amx_int8", "amx_bf16"}
    # In oneDNN's order of preference, lowest first: it takes the last usable one.
    return (
        Level("SSE4.1", "SSE41", sse41),
        Level("AVX", "AVX", avx),
        Level("AVX2", "AVX2", avx2),
        Level("AVX2-VNNI", "AVX2_VNNI", avx2_vnni),
        Level("AVX2-VNNI-2", "AVX2_VNNI_2", avx2_vnni | {"avx_vnni_int8", "avx_ne_convert"}),
        Level("AVX-512", "AVX512_CORE", avx512),
        Level("AVX512-VNNI", "AVX512_CORE_VNNI", avx512 | {"avx512_vnni"}),
        Level("AVX512-BF16", "AVX512_CORE_BF16", avx512_bf16),
        Level("AVX512-FP16", "AVX10_1_512", avx512_fp16),
        Level("AMX", "AVX10_1_512_AMX", amx),
        Level("AMX-FP16", "AVX10_1_512_AMX_FP16", amx | {"amx_fp16"}),
    )


LEVELS = _levels()
# oneDNN's older names for three levels.
_CAP_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}
_BY_CAP = {level.cap: level for level in LEVELS}


def cap_setting(environ=os.environ) -> tuple[str, str] | None:
    """(variable, value) of the cap oneDNN obeys, or None when it obeys none. As oneDNN: the value is
    read in any case, an empty one is as if unset, and one it does not know (or ALL, DEFAULT) caps nothing."""
    for variable in CAP_VARIABLES:
        value = environ.get(variable, "")
        if value:
            cap = value.upper()
            return (variable, value) if _BY_CAP.get(_CAP_ALIASES.get(cap, cap)) else None
    return None


def cpu_features() -> frozenset:
    """The CPU features torch detects (its cpuinfo), as the names LEVELS uses. (A torch older than
    torch.cpu.get_capabilities reports none: the level is then unknown, and nothing is claimed.)"""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return frozenset(name for name, present in capabilities.items() if present is True)


def level(features: frozenset | None = None, environ=os.environ) -> Level | None:
    """The level oneDNN dispatches to on a CPU with `features` (default: this one) under the cap in
    `environ`; None off x86-64, where these levels do not apply."""
    features = cpu_features() if features is None else features
    setting = cap_setting(environ)
    allowed = None
    if setting is not None:
        cap = setting[1].upper()
        allowed = _BY_CAP[_CAP_ALIASES.get(cap, cap)].features
    usable = [lv for lv in LEVELS if lv.features <= features and (allowed is None or lv.features <= allowed)]
    return usable[-1] if usable else None


@functools.cache  # oneDNN reads the cap once, at its first use; so does this
def _level_here() -> Level | None:
    return level()


def onednn_isa() -> str:
    """The level oneDNN dispatches to here, honouring the cap: "AVX2", "AVX-512", "AVX512-BF16", "AMX", ...
    (the machine's architecture, e.g. "aarch64", off x86-64)."""
    found = _level_here()
    return found.name if found is not None else platform.machine() or "unknown"


def describe() -> str:
    """onednn_isa(), with the cap that lowered it: "AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX512-BF16 CPU)"."""
    setting, uncapped = cap_setting(), level(environ={})
    if setting is None or uncapped is None or uncapped == _level_here():
        return onednn_isa()
    return f"{onednn_isa()} ({setting[0]}={setting[1]} on an {uncapped.name} CPU)"


def _has(feature: str) -> bool:
    found = _level_here()
    return found is not None and feature in found.features


def onednn_computes(dtype: torch.dtype) -> bool | None:
    """Whether oneDNN has convolutions in `dtype` at this level (None off x86-64: not known here).
    torch asks oneDNN the same question (torch.ops.mkldnn._is_mkldnn_bf16_supported and _fp16_); the
    tests check that both agree, uncapped and under several caps."""
    if _level_here() is None:
        return None
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return _has("avx512_bw") or _has("avx_ne_convert")
    if dtype == torch.float16:
        return _has("avx512_fp16") or _has("avx_ne_convert")
    return False


def missing_reason(dtype: torch.dtype) -> str:
    """Why oneDNN has no `dtype` convolution here, naming what it would need and the level it runs at."""
    needs = {
        torch.bfloat16: "AVX-512 (AVX512-BW, -VL, -DQ) or AVX-NE-CONVERT",
        torch.float16: "AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT",
    }
    if dtype not in needs:
        return f"oneDNN convolutions take float32, bfloat16 or float16, not {dtype}"
    return f"oneDNN has no {_name(dtype)} convolution at {describe()}: it needs {needs[dtype]}"


def slower_than_float32_reason(dtype: torch.dtype) -> str | None:
    """Why convolutions in `dtype` run slower than in float32 on this CPU (at oneDNN's level, cap
    included), or None when they do not, or when that is not known (off x86-64)."""
    if dtype not in (torch.bfloat16, torch.float16) or _level_here() is None:
        return None
    if not onednn_computes(dtype):
        return f"{missing_reason(dtype)}; PyTorch's generic kernels compute {_name(dtype)} instead"
    if dtype == torch.bfloat16 and not (_has("avx512_bf16") or _has("avx_ne_convert")):
        return f"oneDNN emulates bfloat16 arithmetic at {describe()}, which has no bfloat16 instructions"
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
