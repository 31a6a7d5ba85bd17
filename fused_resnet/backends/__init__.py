"""Backends: one module per way of computing the fused ops.

Every backend module exposes the same five names, so the op layer can treat them alike:

    NAME: str
    unavailable_reason(device) -> str | None
        None when the backend can run on tensors of `device` at all; otherwise why not
        (extension not built, no GPU, Triton missing...). Asking for an unavailable backend
        is an error.
    conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None
        None when this backend computes that case; otherwise why not. An unsupported but valid
        case falls back to the reference backend with a one-time warning.
    conv2d_bias_act(out, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> Tensor | None
        Writes act(conv2d(x, weight) + bias + residual) into `out`, a preallocated channels_last
        tensor of shape (N, Cout, OH, OW) and x's dtype. `x`, `residual` may have any strides;
        `weight` is (Cout, Cin // groups, R, S); `bias` (Cout,) or None; stride, padding and
        dilation are pairs of ints. The arguments were validated before the call. A backend whose
        library allocates its own result may return that tensor instead of writing `out`; the op
        keeps it when its strides are out's, and copies it into `out` otherwise.
    add_relu_unsupported_reason(x, y) -> str | None
    add_relu(out, x, y) -> None
        Writes relu(x + y) into `out` (same shape and dtype as x and y, x's strides).
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from .. import autotune

NAMES = ("cuda", "triton", "cudnn", "onednn", "torch")


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Preference order for backend="auto": the first that is available and serves the case wins.

    Elsewhere: oneDNN when it is available (a CPU, PyTorch built with it) and serves the case, else
    the reference. Triton runs on the CPU only through its slow interpreter.
    """
    return NAMES if device.type == "cuda" else ("onednn", "torch")


_MODULES = {
    "torch": "fused_resnet.backends.reference",
    "triton": "fused_resnet.backends.triton",
    "cuda": "fused_resnet.backends.cuda",
    "cudnn": "fused_resnet.backends.cudnn",
    "onednn": "fused_resnet.backends.onednn",
}
_loaded: dict[str, ModuleType] = {}
_warned: set[tuple[str, str]] = set()
# Guards the first import of a backend and the warning bookkeeping against concurrent callers. Calls
# after the first only read `_loaded`, without the lock. Reentrant, in case importing a backend
# module asks for a backend.
_lock = threading.RLock()


def get(name: str) -> ModuleType:
    """The backend module called `name` (one of NAMES)."""
    if name not in _MODULES:
        raise ValueError(
            f"unknown backend {name!r}; supported backends are {', '.join(repr(n) for n in NAMES)} and 'auto'"
        )
    module = _loaded.get(name)
    if module is None:
        with _lock:
            module = _loaded.get(name)
            if module is None:
                module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def check_name(name: str) -> None:
    if name != "auto":
        get(name)


def available(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on `device`."""
    device = torch.device(device)
    return [name for name in NAMES if get(name).unavailable_reason(device) is None]


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key in _warned:
        return
    with _lock:
        if key in _warned:  # another thread warned first
            return
        _warned.add(key)
    warnings.warn(message, stacklevel=4)


def _select(name: str, device: torch.device, what: str, reason_of, tune=None) -> ModuleType:
    """The backend that will compute one call.

    `reason_of(backend)` says why a backend cannot serve the case (None if it can). For "auto", the
    backends that serve it are candidates; on a GPU `tune(candidates)` picks one by measurement.
    An explicitly named backend that cannot run on the device at all is an error; one that can run
    but does not serve this case falls back to the reference backend, with one warning per reason.
    """
    reference = get("torch")
    if name == "auto":
        candidates = [
            backend
            for backend in map(get, auto_order(device))
            if backend.unavailable_reason(device) is None and reason_of(backend) is None
        ]
        if len(candidates) > 1 and tune is not None:
            return tune(candidates)
        return candidates[0] if candidates else reference
    backend = get(name)
    unavailable = backend.unavailable_reason(device)
    if unavailable is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors: {unavailable}")
    reason = reason_of(backend)
    if reason is None:
        return backend
    _warn_once(
        (name, reason),
        f"fused_resnet: backend {name!r} does not support this {what} ({reason}); "
        "computing it with the reference 'torch' backend instead",
    )
    return reference


# backend="auto" on a GPU: the backend measured fastest for each layer, by a cheap hashable key, so
# that after the first call a layer's backend is one dict lookup away.
_auto_choice: dict[tuple, ModuleType] = {}


def _measure(key: tuple, run) -> Callable[[list[ModuleType]], ModuleType]:
    """A `tune` for _select: times `run(backend)` for each candidate (autotune keeps it on disk)."""

    def tune(candidates: list[ModuleType]) -> ModuleType:
        runs = {b.NAME: (lambda b=b: run(b)) for b in candidates}
        return get(autotune.choose(key[1], " ".join(map(str, key)), runs))

    return tune


def select_conv(name, x, weight, bias, residual, stride, padding, dilation, groups, relu=True, out=None) -> ModuleType:
    def reason_of(b):
        return b.conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups)

    if name != "auto" or x.device.type != "cuda" or out is None:
        return _select(name, x.device, "convolution", reason_of)
    key = (
        "conv2d_bias_act", x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(),
        bias is not None, None if residual is None else residual.stride(),
        tuple(stride), tuple(padding), tuple(dilation), groups, relu,
    )  # fmt: skip
    def run(b):
        return b.conv2d_bias_act(torch.empty_like(out), x, weight, bias, residual, stride, padding, dilation, groups, relu)

    return autotune.remember(
        _auto_choice, key, x.device, lambda: _select(name, x.device, "convolution", reason_of, _measure(key, run))
    )


def select_add_relu(name, x, y) -> ModuleType:
    return _select(name, x.device, "add_relu", lambda b: b.add_relu_unsupported_reason(x, y))
