"""The CUDA C++ backend: kernels compiled from csrc/ into fused_resnet._C.

The extension registers the operators torch.ops.fused_resnet_C.* (schemas in csrc/fused_resnet.cpp):

    add_relu(x, y) / add_relu_out(x, y, out)                    relu(x + y); CPU and CUDA kernels
    conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, relu, config=-1)
    conv2d_bias_act_out(..., relu, config, out)                 CUTLASS implicit-GEMM conv, CUDA only
    conv2d_preact_out(x, weight, bias, residual, scale, shift, stride, padding, dilation, config, out, out_preact)
                                                                y into out, relu(y * scale + shift) into out_preact
    conv2d_configs()                                            names of the conv kernels
    conv2d_kernel(dtype, x_size, weight_size, stride, padding, dilation, residual, capability,
                  sm_count, config=-1)                          which kernel serves a layer on a GPU, or why
                                                                none; whether CUTLASS's can_implement accepts it
    conv2d_layer_unsupported(dtype, in_channels, weight_size)   why no kernel serves a layer, for any batch
    cuda_archs() / cuda_arch_unsupported(major, minor)          the archs it was built for; why it cannot run on one

`config` picks a conv kernel by its index in conv2d_configs() (-1: a heuristic picks per layer).
Which kernels serve a layer is the extension's rule alone (conv2d_kernel, csrc/cuda/conv2d_kernel_choice.h):
this backend asks it rather than keeping a copy. The extension refuses a GPU it has no machine code
for, and so does this backend (unavailable, with the rebuild command).

This backend times the kernels that serve a layer the first time it meets it and keeps the fastest
(fused_resnet.autotune: remembered on disk; FUSED_RESNET_AUTOTUNE=0 leaves the choice to the
heuristic). This module also adds the fake (meta) implementations of those operators, so that
torch.compile and torch.export can trace code that calls them, and the derivatives of the functional ones.

The extension is optional: without it (no CUDA toolkit at install time) the package still imports
and this backend reports why it cannot run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from fused_resnet import autotune, derivatives
from fused_resnet.call import ConvCall
from fused_resnet.validation import check_add_relu, check_conv, check_preact

from .weight_cache import DerivedWeights

NAME = "cuda"

try:
    from fused_resnet import _C  # noqa: F401  (loading it registers the fused_resnet_C ops)

    _LOAD_ERROR = None
    if not hasattr(torch.ops.fused_resnet_C, "conv2d_kernel"):  # a library built from older sources
        _C, _LOAD_ERROR = None, "it predates its sources (no fused_resnet_C::conv2d_kernel): rebuild it"
except ImportError as error:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = error

# Names of the compiled conv kernels; empty when the extension was built without CUTLASS.
CONV_CONFIGS: tuple[str, ...] = tuple(torch.ops.fused_resnet_C.conv2d_configs()) if _C is not None else ()
# The TORCH_CUDA_ARCH_LIST the extension was built with: the GPUs it has machine code for.
BUILT_ARCHS: str = torch.ops.fused_resnet_C.cuda_archs() if _C is not None else ""


def status() -> str:
    """One line: whether the extension is built, with which kernels, or why it is not there."""
    if _C is None:
        if importlib.util.find_spec("fused_resnet._C") is None:
            return "CUDA extension: not built (no CUDA toolkit when installed, or not installed: make setup)"
        return f"CUDA extension: built but does not load: {_LOAD_ERROR}"
    if not CONV_CONFIGS:
        return "CUDA extension: built without the conv kernels (no CUTLASS headers when built)"
    hopper = sum(name.startswith("sm90") for name in CONV_CONFIGS)
    return (
        f"CUDA extension: built, {len(CONV_CONFIGS) - hopper} CUTLASS 2.x conv kernels"
        + (f" and {hopper} Hopper ones (sm_90a)" if hopper else "")
    )


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
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return _arch_unsupported_reason(torch.cuda.get_device_capability(device))


@functools.cache
def _arch_unsupported_reason(capability: tuple[int, int]) -> str | None:
    return torch.ops.fused_resnet_C.cuda_arch_unsupported(*capability) or None


def _gpu(device: torch.device) -> tuple[int, int, int]:
    """(major, minor, SM count) of a CUDA device: what the kernel choice depends on."""
    properties = torch.cuda.get_device_properties(device)
    return properties.major, properties.minor, properties.multi_processor_count


@functools.cache
def _layer_unsupported_reason(dtype: torch.dtype, in_channels: int, weight_size: tuple[int, ...]) -> str | None:
    return torch.ops.fused_resnet_C.conv2d_layer_unsupported(dtype, in_channels, weight_size) or None


@functools.lru_cache(maxsize=4096)
def _query(dtype, x_size, weight_size, stride, padding, dilation, residual, gpu, config) -> tuple[str, str, bool]:
    return torch.ops.fused_resnet_C.conv2d_kernel(
        dtype, x_size, weight_size, stride, padding, dilation, residual, gpu[:2], gpu[2], config
    )


def kernel_choice(x, weight, residual, stride, padding, dilation, config: int = -1) -> tuple[str, str, bool]:
    """The extension's answer for this layer on x's GPU (fused_resnet_C::conv2d_kernel): the name of
    the kernel `config` names (-1: the one its heuristic picks; "" if none), why it cannot serve the
    layer ("" if it can), and whether CUTLASS's can_implement accepts it."""
    return _query(
        x.dtype, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
        residual is not None, _gpu(x.device), config,
    )


def _call_kernel_choice(call, config: int = -1) -> tuple[str, str, bool]:
    return kernel_choice(call.x, call.weight, call.residual, call.stride, call.padding, call.dilation, config)


def kernel_unsupported_reason(x, weight) -> str | None:
    """Why the conv kernels cannot serve this layer whatever the batch, spatial size and GPU (a grouped
    conv shows in the shapes): what export (lower_to="cuda") and the fake kernels can decide for a
    program with a dynamic batch."""
    return _layer_unsupported_reason(x.dtype, int(x.shape[1]), tuple(weight.shape))


def conv_unsupported_reason(call) -> str | None:
    reason = kernel_unsupported_reason(call.x, call.weight)
    if reason is not None:
        return reason
    return _call_kernel_choice(call)[1] or None


# Channels-last (KRSC) copies of weights given in another layout, made once per weight (weight_cache.py).
_krsc_cache = DerivedWeights()


def _krsc(weight: torch.Tensor) -> torch.Tensor:
    if weight.is_contiguous(memory_format=torch.channels_last) or weight.is_inference():
        # Already KRSC in memory, or an inference tensor (no version counter to key a cache on):
        # the extension converts it itself.
        return weight
    return _krsc_cache.get(weight, None, lambda: weight.contiguous(memory_format=torch.channels_last))


def forget(weight: torch.Tensor) -> None:
    _krsc_cache.forget(weight)


def _launch(out, call, config: int) -> None:
    torch.ops.fused_resnet_C.conv2d_bias_act_out(
        call.x, call.weight, call.bias, call.residual, call.stride, call.padding, call.dilation, call.relu, config, out
    )


def _serving_configs(call) -> list[int]:
    return [i for i in range(len(CONV_CONFIGS)) if not _call_kernel_choice(call, i)[1]]


# The kernel measured fastest for each layer, by the call's key (one dict lookup per call).
_config_choice: dict[tuple, int] = {}


def chosen_kernel(call) -> str | None:
    """The name of the kernel measured fastest for this layer ("heuristic (<kernel>)" when the
    extension's size rule picks it), or None before the layer has run; for benchmark reports."""
    config = _config_choice.get(call.replace(weight=_krsc(call.weight)).key)
    if config is None:
        return None
    if config >= 0:
        return CONV_CONFIGS[config]
    return f"{_HEURISTIC} ({_call_kernel_choice(call)[0]})"


def _measured_config(out, call) -> int:
    """The index of the fastest kernel for this layer (-1, the heuristic, when not measuring)."""
    if not autotune.enabled():
        return -1

    def run(config):
        return lambda: _launch(torch.empty_like(out), call, config)

    def measure() -> int:
        # The heuristic comes first: it is what a CUDA graph capture gets for a layer never measured.
        candidates = {_HEURISTIC: run(-1)}
        candidates.update((CONV_CONFIGS[i], run(i)) for i in _serving_configs(call))
        name = autotune.choose(call.device, "fused_resnet_C::" + call.describe(), candidates)
        return -1 if name == _HEURISTIC else CONV_CONFIGS.index(name)

    return autotune.remember(_config_choice, call.key, call.device, measure)


def conv2d_bias_act(out, call, config: int | None = None) -> None:
    """See fused_resnet.backends; `config` picks the kernel (an index into CONV_CONFIGS, -1: the
    heuristic, None: the one measured fastest for this layer)."""
    call = call.replace(weight=_krsc(call.weight))
    if config is None:
        config = _measured_config(out, call)
    _launch(out, call, config)


def preact_unsupported_reason(call) -> str | None:
    """Every conv kernel writes the second output (the CUTLASS 2.x ones through their broadcast epilogue's
    second output iterator, the Hopper ones through their visitor tree): the layer rule is the conv's."""
    return conv_unsupported_reason(call)


def conv2d_preact(out, out_preact, call) -> None:
    """The heuristic's kernel writes both outputs."""
    torch.ops.fused_resnet_C.conv2d_preact_out(
        call.x, _krsc(call.weight), call.bias, call.residual, call.scale, call.shift,
        call.stride, call.padding, call.dilation, -1, out, out_preact,
    )


def add_relu_unsupported_reason(x, y) -> str | None:
    return None


def add_relu(out, x, y) -> None:
    torch.ops.fused_resnet_C.add_relu_out(x, y, out)


def _register_fakes() -> None:
    """Fake implementations of the fused_resnet_C ops: output metadata only, no data. The conv's
    refuses what the CUDA kernel refuses for any batch, with the same RuntimeError."""

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
        shape = _check_conv_kernel(x, weight, bias, residual, stride, padding, dilation)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("fused_resnet_C::conv2d_bias_act_out")
    def _(x, weight, bias, residual, stride, padding, dilation, relu, config, out):
        _check_out(out, _check_conv_kernel(x, weight, bias, residual, stride, padding, dilation), x)

    @torch.library.register_fake("fused_resnet_C::conv2d_preact_out")
    def _(x, weight, bias, residual, scale, shift, stride, padding, dilation, config, out, out_preact):
        shape = _check_conv_kernel(x, weight, bias, residual, stride, padding, dilation)
        check_preact(ConvCall.of(x, weight, bias, residual, stride, padding, dilation, 1, False, scale, shift))
        _check_out(out, shape, x)
        _check_out(out_preact, shape, x)


def _check_conv_kernel(x, weight, bias, residual, stride, padding, dilation) -> tuple[int, int, int, int]:
    """The output shape, after the checks of the CUDA kernel that hold for any batch (raising its
    RuntimeError) and those of check_conv."""
    op = "fused_resnet_C::conv2d_bias_act: "
    if x.device.type != "cuda":
        raise RuntimeError(f"{op}x must be a CUDA tensor, got one on {x.device}")
    if x.dim() == 4 and weight.dim() == 4:
        reason = kernel_unsupported_reason(x, weight)
        if reason is not None:
            raise RuntimeError(op + reason)
    return check_conv(ConvCall.of(x, weight, bias, residual, stride, padding, dilation))


def _register_autograd() -> None:
    """Derivatives of the functional ops: those of the fused ops (fused_resnet.derivatives), which compute
    the same functions. The out= forms have none (csrc/fused_resnet.cpp): backward through them raises."""

    def conv_setup_context(ctx, inputs, output):
        x, weight, bias, residual, stride, padding, dilation, relu, _config = inputs
        derivatives.conv_setup_context(ctx, x, weight, bias, residual, stride, padding, dilation, 1, relu, output)

    def conv_backward(ctx, grad):
        return derivatives.conv_backward(ctx, grad) + (None,) * 5  # nothing for stride .. config

    def add_relu_setup_context(ctx, inputs, output):
        derivatives.add_relu_setup_context(ctx, output)

    torch.library.register_autograd("fused_resnet_C::conv2d_bias_act", conv_backward, setup_context=conv_setup_context)
    torch.library.register_autograd(
        "fused_resnet_C::add_relu", derivatives.add_relu_backward, setup_context=add_relu_setup_context
    )


def _check_out(out, shape, x) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is a {tuple(out.shape)} {out.dtype} tensor on {out.device}; "
            f"expected {tuple(shape)} {x.dtype} on {x.device}"
        )


if _C is not None:
    _register_fakes()
    _register_autograd()
