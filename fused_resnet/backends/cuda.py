"""The CUDA C++ backend: kernels compiled from csrc/ into fused_resnet._C.

The extension registers the operators torch.ops.fused_resnet_C.* (schemas in csrc/fused_resnet.cpp):

    add_relu(x, y) / add_relu_out(x, y, out)                    relu(x + y); CPU and CUDA kernels
    conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, relu, config=-1)
    conv2d_bias_act_out(..., relu, config, out)                 CUTLASS implicit-GEMM conv, CUDA only
    conv2d_configs()                                            names of the conv kernels

`config` picks a conv kernel by its index in conv2d_configs() (-1: a heuristic picks per layer).
This backend times the kernels that serve a layer the first time it meets it and keeps the fastest
(fused_resnet.autotune: remembered on disk; FUSED_RESNET_AUTOTUNE=0 leaves the choice to the
heuristic). This module also adds the fake (meta) implementations of those operators, so that
torch.compile and torch.export can trace code that calls them.

The extension is optional: without it (no CUDA toolkit at install time) the package still imports
and this backend reports why it cannot run.
"""

from __future__ import annotations

import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fused_resnet import autotune
from fused_resnet.validation import check_add_relu, check_conv, conv_output_size

NAME = "cuda"

try:
    from fused_resnet import _C  # noqa: F401  (loading it registers the fused_resnet_C ops)

    _LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = error

# Names of the compiled conv kernels; empty when the extension was built without CUTLASS.
CONV_CONFIGS: tuple[str, ...] = tuple(torch.ops.fused_resnet_C.conv2d_configs()) if _C is not None else ()

# The kernels read and write 16 bytes (8 half-precision values) of output channels at a time, and
# the activation iterators keep per-filter-tap masks in 32-bit words.
_OUT_CHANNEL_MULTIPLE = 8
_MAX_KERNEL_SIZE = 32
# CUTLASS indexes each tensor with 32-bit offsets: every operand must stay below 2 GiB.
_MAX_TENSOR_BYTES = 2**31
# Which kernels serve a layer, by the family their name starts with (csrc/cuda/conv2d_cutlass.h):
# "few_channels" ones inputs with at most 8 channels (kFewChannelsMaxC); "sm90" ones (TMA + wgmma,
# built for sm_90a) compute capability 9.0 and a multiple of 64 input channels; "optimized" ones
# any layer (the launcher pads channels to 8).
_FEW_CHANNELS_PREFIX, _FEW_CHANNELS_MAX = "few_channels", 8
_HOPPER_PREFIX, _HOPPER_CHANNEL_MULTIPLE = "sm90", 64
# TMA's im2col mode encodes padding and filter offsets in narrow fields (under 128 for 2-D): a
# conservative bound, so that a Hopper kernel is never measured on a layer it would refuse.
_HOPPER_MAX_OFFSET = 127
# The name under which autotune stores "let the C++ heuristic pick" (config -1).
_HEURISTIC = "heuristic"


def unavailable_reason(device: torch.device) -> str | None:
    if _C is None:
        return (
            f"the CUDA C++ extension fused_resnet._C is not built ({_LOAD_ERROR}); "
            "reinstall with nvcc on the PATH: pip install --no-build-isolation -e ."
        )
    if device.type != "cuda":
        return "its kernels run on CUDA tensors only"
    return None


def kernel_unsupported_reason(x, weight, groups) -> str | None:
    """Why the conv kernels cannot serve this layer, judged from what does not depend on the batch
    size: what export (lower_to="cuda") can decide for a program with a dynamic batch."""
    if not CONV_CONFIGS:
        return "this build of fused_resnet._C has no conv kernels (the CUTLASS headers were missing at build time)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"its tensor-core conv kernels take float16 and bfloat16, not {x.dtype}"
    if groups != 1:
        return f"grouped convolution (groups={groups}) is not implemented in the CUTLASS conv kernels"
    cout, cin, r, s = weight.shape
    if cin == 0:
        return "the input has no channels"
    if cout % _OUT_CHANNEL_MULTIPLE:
        return f"{cout} output channels: the kernels need a multiple of {_OUT_CHANNEL_MULTIPLE}"
    if r > _MAX_KERNEL_SIZE or s > _MAX_KERNEL_SIZE:
        return f"a {r}x{s} kernel: the kernels take at most {_MAX_KERNEL_SIZE}x{_MAX_KERNEL_SIZE}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return f"its tensor-core kernels need compute capability 8.0 or newer, {x.device} has {major}.{minor}"
    return None


def conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None:
    reason = kernel_unsupported_reason(x, weight, groups)
    if reason is not None:
        return reason
    cout, cin, r, s = weight.shape
    n, _, h, w = x.shape
    channels = -(-cin // 8) * 8  # the extension zero-pads input channels to a multiple of 4 or 8
    oh = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    largest = max(n * h * w * channels, cout * r * s * channels, n * cout * oh * ow) * x.element_size()
    if largest >= _MAX_TENSOR_BYTES:
        return f"an operand of {largest} bytes: the kernels index tensors with 32-bit offsets (below 2 GiB)"
    return None


# Channels-last (KRSC) copies of weights given in another layout, made once per weight version
# rather than once per call. Entries go away with their weight tensor.
_krsc_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _krsc(weight: torch.Tensor) -> torch.Tensor:
    if weight.is_contiguous(memory_format=torch.channels_last) or weight.is_inference():
        # Already KRSC in memory, or an inference tensor (no version counter to key a cache on):
        # the extension converts it itself.
        return weight
    cached = _krsc_cache.get(weight)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    converted = weight.contiguous(memory_format=torch.channels_last)
    _krsc_cache[weight] = (weight._version, converted)
    return converted


def _launch(out, x, weight, bias, residual, stride, padding, dilation, relu, config: int) -> None:
    torch.ops.fused_resnet_C.conv2d_bias_act_out(x, weight, bias, residual, stride, padding, dilation, relu, config, out)


def _serves(name: str, x, weight, padding, dilation) -> bool:
    channels = x.shape[1]
    if name.startswith(_FEW_CHANNELS_PREFIX):
        return channels <= _FEW_CHANNELS_MAX
    if name.startswith(_HOPPER_PREFIX):
        if os.environ.get("FUSED_RESNET_DISABLE_SM90") == "1":  # the extension reads it too
            return False
        capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
        spans = [(size - 1) * d for size, d in zip(weight.shape[2:], dilation)]
        return (
            capability == (9, 0)
            and channels % _HOPPER_CHANNEL_MULTIPLE == 0
            and max(*padding, *spans) <= _HOPPER_MAX_OFFSET
        )
    return True


def _serving_configs(x, weight, padding, dilation) -> list[int]:
    return [i for i, name in enumerate(CONV_CONFIGS) if _serves(name, x, weight, padding, dilation)]


# The kernel measured fastest for each layer, by a cheap hashable key (one dict lookup per call).
_config_choice: dict[tuple, int] = {}


def _choice_key(x, weight, bias, residual, stride, padding, dilation, relu) -> tuple:
    return (
        x.device, x.dtype, x.shape, x.stride(), weight.shape, bias is not None,
        None if residual is None else residual.stride(), tuple(stride), tuple(padding), tuple(dilation), relu,
    )  # fmt: skip


def chosen_kernel(x, weight, bias, residual, stride, padding, dilation, relu) -> str | None:
    """The name of the kernel measured fastest for this layer ("heuristic": the extension's size
    rule), or None before the layer has run; for benchmark reports."""
    config = _config_choice.get(_choice_key(x, weight, bias, residual, stride, padding, dilation, relu))
    return None if config is None else (_HEURISTIC if config < 0 else CONV_CONFIGS[config])


def _measured_config(out, x, weight, bias, residual, stride, padding, dilation, relu) -> int:
    """The index of the fastest kernel for this layer (-1, the heuristic, when not measuring)."""
    if not autotune.enabled():
        return -1

    def run(config):
        return lambda: _launch(torch.empty_like(out), x, weight, bias, residual, stride, padding, dilation, relu, config)

    def measure() -> int:
        # The heuristic comes first: it is what a CUDA graph capture gets for a layer never measured.
        candidates = {_HEURISTIC: run(-1)}
        candidates.update((CONV_CONFIGS[i], run(i)) for i in _serving_configs(x, weight, padding, dilation))
        layer = autotune.layer_key("fused_resnet_C::conv2d_bias_act", (x, weight, bias, residual), stride, padding, dilation, relu)
        name = autotune.choose(x.device, layer, candidates)
        return -1 if name == _HEURISTIC else CONV_CONFIGS.index(name)

    key = _choice_key(x, weight, bias, residual, stride, padding, dilation, relu)
    return autotune.remember(_config_choice, key, x.device, measure)


def conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu, config: int | None = None) -> None:
    """See fused_resnet.backends; `config` picks the kernel (an index into CONV_CONFIGS, -1: the
    heuristic, None: the one measured fastest for this layer)."""
    weight = _krsc(weight)
    if config is None:
        config = _measured_config(out, x, weight, bias, residual, stride, padding, dilation, relu)
    _launch(out, x, weight, bias, residual, stride, padding, dilation, relu, config)


def add_relu_unsupported_reason(x, y) -> str | None:
    return None


def add_relu(out, x, y) -> None:
    torch.ops.fused_resnet_C.add_relu_out(x, y, out)


def _register_fakes() -> None:
    """Fake implementations of the fused_resnet_C ops: output metadata only, no data."""

    @torch.library.register_fake("fused_resnet_C::add_relu")
    def _(x, y):
        check_add_relu(x, y)
        return torch.empty_like(x)

    @torch.library.register_fake("fused_resnet_C::add_relu_out")
    def _(x, y, out):
        check_add_relu(x, y)
        _check_out(out, tuple(x.shape), x)

    @torch.library.register_fake("fused_resnet_C::conv2d_bias_act")
    def _(x, weight, bias, residual, stride, padding, dilation, relu, config=-1):
        shape = check_conv(x, weight, bias, residual, stride, padding, dilation, 1)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("fused_resnet_C::conv2d_bias_act_out")
    def _(x, weight, bias, residual, stride, padding, dilation, relu, config, out):
        _check_out(out, check_conv(x, weight, bias, residual, stride, padding, dilation, 1), x)


def _check_out(out, shape, x) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is a {tuple(out.shape)} {out.dtype} tensor on {out.device}; "
            f"expected {tuple(shape)} {x.dtype} on {x.device}"
        )


if _C is not None:
    _register_fakes()
