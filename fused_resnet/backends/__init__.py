"""Backends: one module per way of computing the fused ops.

Every backend module exposes the same names, so the op layer can treat them alike:

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
        library allocates its own result sets ALLOCATES_OUTPUT = True: it gets out=None and returns
        its result, which the op keeps when it is channels_last and copies otherwise. A backend
        that sets WRITES_INTO_RESIDUAL = True may be given out=residual (when the caller allows it
        and x does not share its memory): it then writes the result over the residual.
    preact_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups) -> str | None
    conv2d_preact(out, out_preact, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)
            -> tuple[Tensor, Tensor] | None
        Writes y = conv2d(x, weight) + bias + residual into `out` and z = relu(y * scale + shift) into
        `out_preact` (scale, shift: (Cout,)), both preallocated channels_last tensors (`out` is None
        for an ALLOCATES_OUTPUT backend), or returns its own (y, z), which the op keeps when they are
        channels_last and copies otherwise.
    add_relu_unsupported_reason(x, y) -> str | None
    add_relu(out, x, y) -> None
        Writes relu(x + y) into `out` (same shape and dtype as x and y, x's strides).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from .. import autotune, self_check

NAMES = ("cuda", "triton", "cudnn", "onednn", "torch")

# With STRICT, a named backend that does not serve a case raises instead of falling back to the
# reference: the test suite sets FUSED_RESNET_STRICT=1, so that a test of a backend cannot pass on
# the reference's numbers.
STRICT = os.environ.get("FUSED_RESNET_STRICT", "0") == "1"


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


# A `backend` argument of the ops that starts with this runs the named backend with its result checked
# against the reference on each layer's first call (see verified()).
_VERIFIED = "verified:"


def verified(name: str) -> str:
    """The `backend` argument that runs backend `name` with each layer's first result checked against
    the reference backend under the parity rule; a layer whose result fails (or raises) is computed
    by the reference from then on, with a warning. For "auto", the backend it takes where it does not
    measure (on a GPU it checks every candidate anyway). The reference needs no check."""
    return name if name == "torch" or name.startswith(_VERIFIED) else _VERIFIED + name


def _parse(name: str) -> tuple[str, bool]:
    """A `backend` argument as (backend name, whether its results are verified)."""
    if name.startswith(_VERIFIED):
        return name.removeprefix(_VERIFIED), True
    return name, False


def check_name(name: str) -> None:
    name = _parse(name)[0]
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
    warnings.warn(message, stacklevel=5)


def fall_back(name: str, what: str, reason: str) -> None:
    """Backend `name` does not serve this `what` for `reason`, and the reference computes it instead:
    one warning per reason, or an error under STRICT."""
    message = f"fused_resnet: backend {name!r} does not support this {what} ({reason})"
    if STRICT:
        raise RuntimeError(f"{message}, and FUSED_RESNET_STRICT=1 forbids falling back to the reference")
    _warn_once((name, reason), f"{message}; computing it with the reference 'torch' backend instead")


# The lists of the open record_serving() blocks.
_records: list[list[str]] = []


@contextlib.contextmanager
def record_serving() -> Iterator[list[str]]:
    """Collects, in call order, the NAME of the backend that computed each fused op called inside the
    block ("torch" where a named backend fell back), so that a test can prove which backend served."""
    served: list[str] = []
    _records.append(served)
    try:
        yield served
    finally:
        _records.remove(served)


def note_serving(backend: ModuleType) -> ModuleType:
    """Adds `backend` to every open record_serving() list, and returns it (for the op that calls it)."""
    for served in _records:
        served.append(backend.NAME)
    return backend


def _select(name: str, device: torch.device, what: str, reason_of, tune=None) -> ModuleType:
    """The backend that will compute one call.

    `reason_of(backend)` says why a backend cannot serve the case (None if it can). For "auto", the
    backends that serve it are candidates; on a GPU `tune(candidates)` picks one by measurement.
    An explicitly named backend that cannot run on the device at all is an error; one that can run
    but does not serve this case falls back to the reference backend (see fall_back).
    """
    reference = get("torch")
    if name == "auto":
        candidates = (
            backend
            for backend in map(get, auto_order(device))
            if backend.unavailable_reason(device) is None and reason_of(backend) is None
        )
        if tune is None:
            return next(candidates, reference)
        candidates = list(candidates)
        if len(candidates) > 1:
            return tune(candidates)
        return candidates[0] if candidates else reference
    backend = get(name)
    unavailable = backend.unavailable_reason(device)
    if unavailable is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors: {unavailable}")
    reason = reason_of(backend)
    if reason is None:
        return backend
    fall_back(name, what, reason)
    return reference


# Device types on which backend="auto" measures and checks its candidates per layer; elsewhere it
# takes the first that serves the case.
MEASURED_DEVICE_TYPES = ("cuda",)

# The backend chosen under a check for each layer (backend="auto", or a verified named backend), by
# a cheap hashable key, so that after the first call a layer's backend is one dict lookup away.
_checked_choice: dict[tuple, ModuleType] = {}


def _check(run, disagreement, candidate: str) -> str | None:
    """Why backend `candidate`'s output for a layer is wrong (None when it is right)."""
    if candidate == "torch":
        return None  # the reference itself, what the others are checked against
    return disagreement(run(get(candidate), True))


def _checked(name: str, verify: bool, device: torch.device) -> bool:
    """Whether a call's backend is chosen under a check (_select_checked), or simply (_select)."""
    return verify or (name == "auto" and device.type in MEASURED_DEVICE_TYPES)


def _select_checked(name: str, layer: tuple, device: torch.device, what: str, reason_of, run, checker) -> ModuleType:
    """_select, with the backend's result checked against the reference on the layer's first call.

    `layer` is the layer's key. `run(backend, poisoned)` computes the layer into a new output,
    NaN-filled first if `poisoned` (an element a kernel forgets to write then fails the check), and
    returns it; `checker()` makes the check (fused_resnet.self_check). backend="auto" on a GPU runs,
    checks and times each candidate (autotune.choose, which keeps choices and exclusions on disk); a
    verified backend is run and checked, and replaced by the reference for the layer if it fails.
    """
    if name == "auto" and device.type in MEASURED_DEVICE_TYPES:
        key = layer

        def tune(candidates: list[ModuleType]) -> ModuleType:
            runs = {b.NAME: functools.partial(run, b, False) for b in candidates}
            check = functools.partial(_check, run, checker())
            return get(autotune.choose(device, " ".join(map(str, key)), runs, check))

        return autotune.remember(_checked_choice, key, device, lambda: _select(name, device, what, reason_of, tune))
    backend = _select(name, device, what, reason_of)
    if backend is get("torch"):
        return backend

    key = (name, *layer)

    def verify_once() -> ModuleType:
        runs = {b.NAME: functools.partial(run, b, False) for b in (backend, get("torch"))}
        check = functools.partial(_check, run, checker())
        return get(autotune.choose(device, " ".join(map(str, key)), runs, check, measure=False))

    return autotune.remember(_checked_choice, key, device, verify_once)


def preallocated(backend: ModuleType, make) -> torch.Tensor | None:
    """`make()`, the output `backend` is to write, or None for a backend that allocates its own (ALLOCATES_OUTPUT)."""
    return None if getattr(backend, "ALLOCATES_OUTPUT", False) else make()


def _scratch(like: torch.Tensor, poisoned: bool, shape=None) -> torch.Tensor:
    """A new tensor of `like`'s dtype and device, and `like`'s shape and strides or a channels_last `shape`."""
    if shape is None:
        scratch = torch.empty_like(like)
    else:
        scratch = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    return scratch.fill_(float("nan")) if poisoned else scratch


def select_conv(name, x, weight, bias, residual, stride, padding, dilation, groups, relu=True, out_shape=None) -> ModuleType:
    """The backend for this conv. With `out_shape` (the output's), a checked choice may run candidates."""
    def reason_of(b):
        return b.conv_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups)

    name, verify = _parse(name)
    if out_shape is None or not _checked(name, verify, x.device):
        return note_serving(_select(name, x.device, "convolution", reason_of))

    layer = (
        "conv2d_bias_act", x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(),
        bias is not None, None if residual is None else residual.stride(),
        tuple(stride), tuple(padding), tuple(dilation), groups, relu,
    )  # fmt: skip

    def run(b, poisoned):
        scratch = preallocated(b, lambda: _scratch(x, poisoned, out_shape))
        result = b.conv2d_bias_act(scratch, x, weight, bias, residual, stride, padding, dilation, groups, relu)
        return scratch if result is None else result

    def checker():
        return self_check.conv_checker(x, weight, bias, residual, stride, padding, dilation, groups, relu)

    return note_serving(_select_checked(name, layer, x.device, "convolution", reason_of, run, checker))


_PREACT = "convolution with a pre-activation output"


def select_preact(name, x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, out=None) -> ModuleType:
    def reason_of(b):
        return b.preact_unsupported_reason(x, weight, bias, residual, stride, padding, dilation, groups)

    name, verify = _parse(name)
    if out is None or not _checked(name, verify, x.device):
        return note_serving(_select(name, x.device, _PREACT, reason_of))

    layer = (
        "conv2d_preact", x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(),
        bias is not None, None if residual is None else residual.stride(),
        tuple(stride), tuple(padding), tuple(dilation), groups,
    )  # fmt: skip
    args = (x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)

    def run(b, poisoned):
        y, z = preallocated(b, lambda: _scratch(out, poisoned)), _scratch(out, poisoned)
        result = b.conv2d_preact(y, z, *args)
        return (y, z) if result is None else tuple(result)  # checked one by one (self_check.preact_checker)

    def checker():
        return self_check.preact_checker(*args)

    return note_serving(_select_checked(name, layer, x.device, _PREACT, reason_of, run, checker))


def select_add_relu(name, x, y) -> ModuleType:
    def reason_of(b):
        return b.add_relu_unsupported_reason(x, y)

    name, verify = _parse(name)
    if not _checked(name, verify, x.device):
        return note_serving(_select(name, x.device, "add_relu", reason_of))

    layer = ("add_relu", x.device, x.dtype, x.shape, x.stride(), y.stride())

    def run(b, poisoned):
        scratch = _scratch(x, poisoned)
        b.add_relu(scratch, x, y)
        return scratch

    def checker():
        return self_check.add_relu_checker(x, y)

    return note_serving(_select_checked(name, layer, x.device, "add_relu", reason_of, run, checker))
