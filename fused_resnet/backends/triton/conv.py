"""conv2d + bias (+ residual) (+ ReLU) as one Triton implicit-GEMM kernel over channels_last data.

The convolution is a GEMM that is never materialised:

    out[m, co] = sum_k  A[m, k] * B[k, co]       m  = (image, oh, ow)      M = N * OH * OW
                                                  co = output channel      per group: Cout / groups
                                                  k  = (r, s, c)           K = R * S * Cin / groups

A[m, k] is gathered from the NHWC input on the fly (zero where the tap falls into the padding), B is
the weight arranged as (Cout, R, S, Cin / groups), so that both operands are K-major: channels are
the contiguous dimension of the input, and K-major operands are what the tensor cores read for every
dtype (tf32 included; fp32 runs as three TF32 products, see launch). The fp32 accumulator gets the epilogue in registers (+ bias, + residual, ReLU)
and is cast and stored once: no intermediate tensor between the convolution and the epilogue. With
PREACT the epilogue also stores a second output, relu(y * scale + shift) per output channel: the next
block's BatchNorm + ReLU of a pre-activation ResNet, written from the same registers.

Groups are the second grid axis; the tiles of a program lie inside one group, so a grouped conv
(ResNeXt) costs no tile that mixes groups, and a group's K loop runs only over its own channels.
A 1x1, stride-1, unpadded conv is a plain GEMM: the PLAIN_GEMM specialisation drops the spatial
masks. On a GPU the tile sizes are autotuned per layer shape and dtype; under TRITON_INTERPRET=1
one large-block config is used (see _kernel_and_meta).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import autotune
from ..weight_cache import DerivedWeights
from ...validation import conv_output_size
from .runtime import interpreting, on_device_of

_INT32_MAX = 2**31 - 1
# CUDA allows at most 65535 blocks along the second grid axis, which holds the groups.
_MAX_GROUPS = 65535


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if UPCAST:
        # The interpreter (triton 3.8) multiplies bfloat16 operands as their raw 16-bit patterns.
        # Upcasting is exact (products of bf16 values fit in fp32), so results equal the GPU's.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _conv_kernel(
    x_ptr,  # (N, H, W, C) dense: the input in channels_last
    w_ptr,  # (Cout, R, S, Cin / groups) dense
    bias_ptr,
    res_ptr,
    out_ptr,
    scale_ptr,  # PREACT: (Cout,) dense
    shift_ptr,  # PREACT: (Cout,) dense
    preact_ptr,  # PREACT: the second output, with out's strides
    M,
    H,
    W,
    C,
    OH,
    OW,
    CIN_G,
    COUT_G,
    K_TOTAL,  # R * S * CIN_G
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    stride_bias,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    PLAIN_GEMM: tl.constexpr,  # 1x1, stride 1, no padding: every tap is inside the image
    FLAT_K: tl.constexpr,  # walk K as one flat range (few channels per group) instead of tap by tap
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    PREACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Consecutive programs share B tiles: visit GROUP_M row tiles per column of tiles (L2 reuse).
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    pids_per_band = GROUP_M * num_pid_n
    first_m = (pid // pids_per_band) * GROUP_M
    band_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < COUT_G

    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OH * OW)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # 64-bit image offsets (a batch may exceed 2**31 elements); offsets inside one image are 32-bit,
    # which conv_unsupported_reason guarantees.
    x_img = x_ptr + img.to(tl.int64) * H * W * C + group * CIN_G
    w_rows = w_ptr + (group * COUT_G + offs_n).to(tl.int64) * K_TOTAL

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # k -> (r, s, c) per column: 2-D address math, but no K padding when CIN_G is tiny
        # (the stem's 3 channels, ResNeXt's 4 or 8 channels per group).
        for k0 in range(0, K_TOTAL, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K_TOTAL
            c = k % CIN_G
            tap = k // CIN_G
            ih = ih0[:, None] + ((tap // KERNEL_W) * DIL_H)[None, :]
            iw = iw0[:, None] + ((tap % KERNEL_W) * DIL_W)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_img[:, None] + (ih * W + iw) * C + c[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_rows[None, :] + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, UPCAST, INPUT_PRECISION)
    else:
        # One tap (r, s) and BLOCK_K channels per step: the tap is a scalar, so the per-step
        # address math is one vector over rows, not a BLOCK_M x BLOCK_K tile of divisions.
        a_rows = x_img + (ih0 * W + iw0) * C  # may point into the padding: masked below
        k_tiles = tl.cdiv(CIN_G, BLOCK_K)
        for t in range(0, KERNEL_H * KERNEL_W * k_tiles):
            tap = t // k_tiles
            c = (t - tap * k_tiles) * BLOCK_K + offs_k
            c_ok = c < CIN_G
            r = tap // KERNEL_W
            s = tap % KERNEL_W
            if PLAIN_GEMM:
                row_ok = m_ok
            else:
                ih = ih0 + r * DIL_H
                iw = iw0 + s * DIL_W
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_cols = (r * DIL_H * W + s * DIL_W) * C + c
            a = tl.load(a_rows[:, None] + a_cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_rows[None, :] + (tap * CIN_G + c)[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, UPCAST, INPUT_PRECISION)

    co = group * COUT_G + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    img64 = img.to(tl.int64)
    co64 = co.to(tl.int64)
    if HAS_RESIDUAL:
        res_rows = res_ptr + img64 * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
        acc += tl.load(res_rows[:, None] + co64[None, :] * stride_rc, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    out_offsets = (img64 * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow)[:, None] + (
        co64 * stride_oc
    )[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if PREACT:
        # From the fp32 value of y, before its rounding to the output type.
        scale = tl.load(scale_ptr + co, mask=n_ok, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + co, mask=n_ok, other=0.0).to(tl.float32)
        z = acc * scale[None, :] + shift[None, :]
        z = tl.where(z < 0.0, 0.0, z)
        tl.store(preact_ptr + out_offsets, z.to(preact_ptr.dtype.element_ty), mask=mask)


def _pow2_at_least(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


def _k_step(flat_k: bool, k_total: int, cin_g: int) -> int:
    """How many K columns one step of the kernel's loop can use."""
    return k_total if flat_k else cin_g


# Tiles for Hopper: 128x128 with 8 warps fills the wgmma units on large layers; the narrow and
# short ones serve late layers (small M), grouped layers (small Cout per group) and batch 1.
# 128x256 and 256x128 serve as 128x64 and 256x64 once shrunk to 64-channel layers: at full size
# they hold 128 accumulators per thread, spill, and pruning drops them (_registers_fit).
_TUNING_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in (
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 32, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (128, 16, 64, 4, 3),
        (64, 16, 32, 4, 3),
    )
]


def shrunk_configs(m, cout_g: int, k_step: int) -> list:
    """The tuning configs shrunk to the problem (no 256-wide tile for 16 channels), without duplicates.

    `m` (N * OH * OW) may be symbolic while torch.export or AOTInductor trace a dynamic batch: it
    then caps nothing, so that choosing the tiles never depends on (and never guards) the batch size.
    """
    m_cap = _pow2_at_least(m) if isinstance(m, int) else None
    n_cap = _pow2_at_least(cout_g)
    k_cap = _pow2_at_least(k_step)
    kept = {}
    for config in _TUNING_CONFIGS:
        bm = config.kwargs["BLOCK_M"] if m_cap is None else min(config.kwargs["BLOCK_M"], m_cap)
        bn = min(config.kwargs["BLOCK_N"], n_cap)
        bk = min(config.kwargs["BLOCK_K"], k_cap)
        warps = config.num_warps if bm * bn >= 128 * 64 else 4
        stages = config.num_stages
        kept.setdefault(
            (bm, bn, bk, warps, stages),
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages),
        )
    return list(kept.values())


def shared_memory_estimate(config, element_size: int, precision: str, arch: int) -> int:
    """Bytes of shared memory the compiled kernel needs for `config` on compute capability `arch`
    (86 for 8.6), at most: tools/triton_static.py checks it against the compiled kernels' own figure.

    The pipeline holds num_stages tiles of A and B (sm_80 often keeps one stage fewer, and the flat
    K walk's gathered loads only one); tf32x3 on Hopper's wgmma keeps one more tile of B. The
    epilogue may stage the fp32 accumulator through shared memory instead (not at the same time).
    """
    block_m, block_n, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    tiles = config.num_stages * (block_m + block_n) + (block_n if precision == "tf32x3" and arch >= 90 else 0)
    return max(tiles * block_k * element_size, block_m * block_n * 4)


def _registers_fit(config, flat_k: bool) -> bool:
    """Whether ptxas can keep the tile in registers: per thread, at most 64 fp32 accumulator values,
    and with the flat K walk (an address and a mask computed per element of the A tile) at most 32
    elements of the A tile. Bigger tiles spill (tools/triton_static.py finds spills in fp16 on sm_80
    and sm_90a: 128x256 on 1x1 layers, 128x16x64 on ResNeXt's grouped 3x3).

    The same budget holds for every epilogue (bias, residual, ReLU, PREACT's second store), measured
    rather than assumed: PREACT moves a kept tile's registers by -26 to +38, yet compiled with it for
    sm_80 and sm_90a (tools/triton_static.py, every tile of its layers), the fp16 and bf16 tiles this
    rule keeps use at most 247 registers (255 with the flat K walk, as without PREACT) and none of the
    552 spills, while 86 of the 112 it drops do. A margin per epilogue would drop the 64-accumulator
    tiles, the fastest on large layers, for no spill found; the static check compiles tiles with
    PREACT too, so that one that starts to spill is caught there."""
    threads = 32 * config.num_warps
    block_m, block_n, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return block_m * block_n <= 64 * threads and (not flat_k or block_m * block_k <= 32 * threads)


def fitting_configs(named: dict, limit: int, arch: int) -> list:
    """The configs for the kernel's named arguments: shrunk to the problem, kept in registers, and
    within `limit` bytes of shared memory on compute capability `arch` (the smallest tile always
    stays: it is the kernel's fallback)."""
    configs = shrunk_configs(*problem_size(named))
    element_size, precision = named["x_ptr"].element_size(), named["INPUT_PRECISION"]
    fitting = [c for c in configs if _registers_fit(c, named["FLAT_K"])
               and shared_memory_estimate(c, element_size, precision, arch) <= limit]
    return fitting or configs[-1:]


def named_arguments(args: tuple, constexprs: dict) -> dict:
    return {**dict(zip(_conv_kernel.arg_names, args)), **constexprs}


def problem_size(named: dict) -> tuple:
    """(M, Cout per group, K columns per loop step) of a launch, from the kernel's named arguments."""
    return named["M"], named["COUT_G"], _k_step(named["FLAT_K"], named["K_TOTAL"], named["CIN_G"])


def _prune_configs(configs, named_args, **kwargs):
    return fitting_configs({**named_args, **kwargs}, *_shared_memory_and_arch(named_args["x_ptr"].device))


# The meta-parameters the autotuner chooses; every other constexpr argument changes the compiled code
# (the epilogue's loads, stores and live registers: HAS_BIAS, HAS_RESIDUAL, RELU, PREACT; the K walk;
# the dot's precision), so a tile tuned for one value must not be reused for another.
_TILE_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# Read from the signature as Triton does (the interpreter's kernels have no `params`).
_CODE_CONSTEXPRS = [name for name, p in inspect.signature(_conv_kernel.fn).parameters.items()
                    if "constexpr" in str(p.annotation) and name not in _TILE_META]

_conv_kernel_tuned = triton.autotune(
    configs=_TUNING_CONFIGS,
    # The layer's sizes and the kernel's code; the autotuner adds the dtypes of the tensor arguments.
    key=["M", "H", "W", "C", "OH", "OW", "CIN_G", "COUT_G", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W",
         "DIL_H", "DIL_W", *_CODE_CONSTEXPRS],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(_conv_kernel)


def _meta(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


@functools.cache
def _device_properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def _shared_memory_and_arch(device: torch.device) -> tuple[int, int]:
    """What pruning needs to know of the device: the bytes of shared memory one program may use (what
    the driver grants on opt-in, the limit Triton checks when it loads a kernel: 163 KB on A100, 99 KB
    on sm_86/89, 227 KB on H100) and the compute capability as a number (86 for 8.6)."""
    properties = _device_properties(device)
    return properties.shared_memory_per_block_optin, properties.major * 10 + properties.minor


def _untuned_config(configs: list, m, cout_g: int, groups: int, device: torch.device):
    """Without measurement: the largest tile that still gives every SM a program (else the smallest)."""
    if not isinstance(m, int):
        return configs[0]
    programs_wanted = _device_properties(device).multi_processor_count
    for config in configs:
        programs = triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(cout_g, config.kwargs["BLOCK_N"]) * groups
        if programs >= programs_wanted:
            return config
    return configs[-1]


def _tuning_key(named: dict) -> tuple:
    """The key under which Triton's autotuner stores the config it chose for these arguments."""
    tensors = [v for name, v in named.items() if name in _conv_kernel.arg_names and hasattr(v, "dtype")]
    return (*(named[name] for name in _conv_kernel_tuned.keys), *(str(t.dtype) for t in tensors))


def _kernel_and_meta(x: torch.Tensor, named: dict, groups: int):
    """The kernel to launch and the meta-parameters the call must pass, for the kernel's named arguments.

    On a GPU the autotuner times the configs that fit the layer, once per layer shape and dtype;
    with FUSED_RESNET_AUTOTUNE=0 nothing is timed and a size rule picks the tile (_untuned_config).
    While a CUDA graph is captured nothing may be timed (timing synchronises, which breaks the
    capture): a layer the autotuner has not seen yet gets the size rule's tile, and the autotuner's
    memory stays empty for it, so that it is tuned on its first call outside a capture.
    Under TRITON_INTERPRET=1 every program runs in Python, so benchmarking configs would take
    minutes and means nothing: use one config, with blocks as large as the problem allows
    (fewer programs and loop steps), capped so that the tests still cross tile boundaries.
    """
    m, cout_g, k_step = problem_size(named)
    if interpreting():
        meta = {
            "BLOCK_M": min(_pow2_at_least(m), 64),
            "BLOCK_N": min(_pow2_at_least(cout_g), 32),
            "BLOCK_K": min(_pow2_at_least(k_step), 32),
            "num_warps": 4,
            "num_stages": 1,
        }
        return _conv_kernel, meta
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if autotune.enabled() and not capturing:
        return _conv_kernel_tuned, {}
    tuned = _conv_kernel_tuned.cache.get(_tuning_key(named)) if capturing else None
    if tuned is not None:
        return _conv_kernel, _meta(tuned)
    configs = fitting_configs(named, *_shared_memory_and_arch(x.device))
    return _conv_kernel, _meta(_untuned_config(configs, m, cout_g, groups, x.device))


# Arranged weights, for weights that are not channels_last already (see gemm_weight).
_arranged = DerivedWeights()


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the kernel's B operand: (Cout, R, S, Cin / groups), dense.

    A channels_last weight already is that, as a view: no copy. Any other weight is copied once and
    the copy is kept (backends/weight_cache.py), so a model that keeps NCHW weights does not re-arrange
    them on every call.
    """
    arranged = weight.detach().permute(0, 2, 3, 1)  # a kept copy must not hold an autograd graph
    if arranged.is_contiguous():
        return arranged
    return _arranged.get(weight, None, arranged.contiguous)


def forget(weight: torch.Tensor) -> None:
    _arranged.forget(weight)


def use_tf32(x: torch.Tensor) -> bool:
    """Whether an fp32 convolution may run on TF32 tensor cores: on CUDA, when eager PyTorch lets
    cuDNN use them (torch.backends.cudnn.allow_tf32)."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return False
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:  # raised once the legacy flag and the per-op flags were set apart
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def unsupported_reason(x, weight, stride, padding, dilation, groups) -> str | None:
    if x.dtype == torch.float64:
        return "float64 is computed by the reference backend"
    if groups > _MAX_GROUPS:
        return f"groups={groups} is more than the {_MAX_GROUPS} the launch grid can hold"
    n, c, h, w = x.shape
    if h * w * c > _INT32_MAX:
        return "one image of the input has more than 2**31 - 1 elements"
    oh = conv_output_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    if n * oh * ow > _INT32_MAX - 256:  # row indices are 32-bit, up to one tile past the end
        return "the output has more than 2**31 - 257 pixels (N * OH * OW)"
    if x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "bfloat16 tensor-core products need compute capability 8.0 or newer"
    return None


def conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> None:
    # A fused network passes channels_last already, so this is free there.
    x = x.contiguous(memory_format=torch.channels_last)
    launch(out, x, gemm_weight(weight), bias, residual, stride, padding, dilation, groups, relu)


def conv2d_preact(out, out_preact, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups) -> None:
    x = x.contiguous(memory_format=torch.channels_last)
    preact = Preact(scale.contiguous(), shift.contiguous(), out_preact)
    launch(out, x, gemm_weight(weight), bias, residual, stride, padding, dilation, groups, False, preact=preact)


class Preact(NamedTuple):
    """The epilogue's second output: out = relu(y * scale + shift), `out` with the strides of y's."""

    scale: torch.Tensor
    shift: torch.Tensor
    out: torch.Tensor


def kernel_arguments(out, x, w, bias, residual, stride, padding, dilation, groups, relu, precision, preact=None):
    """The kernel's positional arguments and its constexpr keyword arguments (all but the tile
    meta-parameters) for one layer: what a launch passes, and what the static checks compile with.
    `preact`: a Preact for the second output, or None."""
    if preact is not None and preact.out.stride() != out.stride():
        raise ValueError(f"the pre-activation output has strides {preact.out.stride()}, y {out.stride()}: they must match")
    n, c, h, wid = x.shape
    cout, r, s, cin_g = w.shape
    oh, ow = out.shape[2], out.shape[3]
    args = (
        x,
        w,
        x if bias is None else bias,
        x if residual is None else residual,
        out,
        *((x, x, x) if preact is None else preact),
        n * oh * ow,
        h,
        wid,
        c,
        oh,
        ow,
        cin_g,
        cout // groups,
        r * s * cin_g,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        0 if bias is None else bias.stride(0),
        *((0, 0, 0, 0) if residual is None else residual.stride()),
        *out.stride(),
    )
    constexprs = dict(
        KERNEL_H=r,
        KERNEL_W=s,
        PLAIN_GEMM=r == 1 and s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0),
        # The tap-by-tap loop pads each step's channels up to BLOCK_K (>= 16); with fewer channels
        # per group than that, a flat walk over all of K wastes less of each tensor-core step.
        FLAT_K=r * s > 1 and cin_g % 16 != 0,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        PREACT=preact is not None,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        INPUT_PRECISION=precision,
        GROUP_M=8,
    )
    return args, constexprs


def input_precision(x: torch.Tensor) -> str:
    """tl.dot's input precision for x's dtype.

    fp32 on tensor cores takes three TF32 products per step (big*big + big*small + small*big,
    "tf32x3"), which keeps fp32 accuracy: plain TF32 would be as accurate as eager only where cuDNN
    itself picks a TF32 algorithm, and it does not for every layer (small or grouped ones).
    """
    if x.dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "tf32x3" if use_tf32(x) else "ieee"


def launch(out, x, w, bias, residual, stride, padding, dilation, groups, relu, *, preact=None, traceable=False) -> None:
    """Runs the kernel: `x` channels_last, `w` the weight as gemm_weight arranges it, `out` channels_last;
    `preact` (a Preact) adds the second output.

    traceable: launch through torch.library.wrap_triton, so that torch.compile, torch.export and
    AOTInductor record the kernel itself in their graph (see fused_resnet/triton_ops.py); a plain launch otherwise.
    """
    args, constexprs = kernel_arguments(out, x, w, bias, residual, stride, padding, dilation, groups, relu,
                                        input_precision(x), preact)
    named = named_arguments(args, constexprs)
    m, cout_g = named["M"], named["COUT_G"]

    def grid(config):
        return (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(cout_g, config["BLOCK_N"]), groups)

    # The capture check, the autotuner's timing and the launch all act on the current device.
    with on_device_of(x):
        kernel, meta = _kernel_and_meta(x, named, groups)
        if traceable:
            kernel = torch.library.wrap_triton(kernel)
        kernel[grid](*args, **constexprs, **meta)
