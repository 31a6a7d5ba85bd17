"""Which backend serves a call, and the output it writes: selection, fallback, strict mode, checked
choices, the serving record, preallocation and output poisoning.

The ops (fused_resnet.ops) describe a validated call as a ConvCall and hand it here; this module
picks a backend (fused_resnet.backends) and runs it:

- backend="auto": the first available backend in the "auto" order that serves the case; on a GPU,
  each candidate is run, checked against the reference (fused_resnet.self_check) and timed on a
  layer's first call, and the fastest that passes is kept (fused_resnet.autotune).
- a named backend: that one; a case it does not serve falls back to the reference with one warning
  per reason, or raises under STRICT. verified(name) checks its result on each layer's first call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import autotune, backends, self_check
from .call import AddReluCall, ConvCall

# With STRICT, a named backend that does not serve a case raises instead of falling back to the
# reference: the test suite sets FUSED_RESNET_STRICT=1, so that a test of a backend cannot pass on
# the reference's numbers.
STRICT = os.environ.get("FUSED_RESNET_STRICT", "0") == "1"

# When True, outputs are filled with NaN before a backend writes them, so an element a kernel
# forgets to write shows up as NaN downstream. For tests and debugging; it costs a fill per op.
POISON_OUTPUTS = False

# Device types on which backend="auto" measures and checks its candidates per layer; elsewhere it
# takes the first that serves the case.
MEASURED_DEVICE_TYPES = ("cuda",)

_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


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


# The record_serving() lists open in each thread, and those open for every thread.
_records = threading.local()
_records_of_all_threads: list[list[str]] = []


@contextlib.contextmanager
def record_serving(all_threads: bool = False) -> Iterator[list[str]]:
    """Collects, in call order, the NAME of the backend that computed each fused op this thread (or, with
    `all_threads`, any thread) calls inside the block ("torch" where a named backend fell back), so that a
    test can prove which backend served."""
    served: list[str] = []
    if all_threads:
        records = _records_of_all_threads
    else:
        if not hasattr(_records, "open"):
            _records.open = []
        records = _records.open
    records.append(served)
    try:
        yield served
    finally:
        records.remove(served)


def note_serving(backend: ModuleType) -> ModuleType:
    """Adds `backend` to the open record_serving() lists that see this thread, and returns it."""
    for served in (*getattr(_records, "open", ()), *_records_of_all_threads):
        served.append(backend.NAME)
    return backend


def new_output(like: Tensor, shape) -> Tensor:
    """A channels_last tensor of `shape` and `like`'s dtype and device, NaN-filled under POISON_OUTPUTS."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def preallocated(backend: ModuleType, make: Callable[[], Tensor]) -> Tensor | None:
    """`make()`, the output `backend` is to write, or None for a backend that allocates its own (ALLOCATES_OUTPUT)."""
    return None if getattr(backend, "ALLOCATES_OUTPUT", False) else make()


def channels_last_strides(shape) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def _as_output(result: Tensor | None, out: Tensor | None, like: Tensor, shape) -> Tensor:
    """What a backend computed, as the op's channels_last output of `shape`: `out` when the backend
    wrote it, the backend's own tensor when it is channels_last, else a channels_last copy of it."""
    if result is None or result is out:
        return out
    if result.stride() == channels_last_strides(shape):
        return result
    return (new_output(like, shape) if out is None else out).copy_(result)


def _scratch(like: Tensor, poisoned: bool, shape=None) -> Tensor:
    """A new tensor of `like`'s dtype and device, and `like`'s shape and strides or a channels_last `shape`."""
    if shape is None:
        scratch = torch.empty_like(like)
    else:
        scratch = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    return scratch.fill_(float("nan")) if poisoned else scratch


@dataclass(frozen=True)
class _Op:
    """What dispatch needs to know of one fused op: its words, how a backend says it serves a call,
    how to run a backend into scratch outputs (for checks and timing), and the check of a result."""

    what: str
    unsupported_reason: Callable[[ModuleType, object], str | None]
    run_into_scratch: Callable[[ModuleType, object, tuple, bool], Tensor | tuple[Tensor, ...]]
    checker: Callable[[object], Callable[[Tensor], str | None]]


def _run_conv(backend, call: ConvCall, shape, poisoned: bool) -> Tensor:
    out = preallocated(backend, lambda: _scratch(call.x, poisoned, shape))
    result = backend.conv2d_bias_act(out, call)
    return out if result is None else result


def _run_preact(backend, call: ConvCall, shape, poisoned: bool) -> tuple[Tensor, Tensor]:
    y, z = preallocated(backend, lambda: _scratch(call.x, poisoned, shape)), _scratch(call.x, poisoned, shape)
    result = backend.conv2d_preact(y, z, call)
    return (y, z) if result is None else tuple(result)


def _run_add_relu(backend, call: AddReluCall, shape, poisoned: bool) -> Tensor:
    out = _scratch(call.x, poisoned)
    backend.add_relu(out, call.x, call.y)
    return out


# The checkers are looked up at each use, so that a test can replace them.
CONV = _Op(
    "convolution", lambda b, call: b.conv_unsupported_reason(call), _run_conv, lambda call: self_check.conv_checker(call)
)
PREACT = _Op(
    "convolution with a pre-activation output",
    lambda b, call: b.preact_unsupported_reason(call),
    _run_preact,
    lambda call: self_check.preact_checker(call),
)
ADD_RELU = _Op(
    "add_relu",
    lambda b, call: b.add_relu_unsupported_reason(call.x, call.y),
    _run_add_relu,
    lambda call: self_check.add_relu_checker(call),
)


def _select(op: _Op, name: str, call, tune=None) -> ModuleType:
    """The backend that will compute one call.

    For "auto", the backends that serve the case are candidates; on a GPU `tune(candidates)` picks one
    by measurement. An explicitly named backend that cannot run on the device at all is an error; one
    that can run but does not serve this case falls back to the reference backend (see fall_back).
    """
    device = call.device
    reference = backends.get(backends.REFERENCE)
    if name == "auto":
        candidates = (
            backend
            for backend in map(backends.get, backends.auto_order(device))
            if backend.unavailable_reason(device) is None and op.unsupported_reason(backend, call) is None
        )
        if tune is None:
            return next(candidates, reference)
        candidates = list(candidates)
        if len(candidates) > 1:
            return tune(candidates)
        return candidates[0] if candidates else reference
    backend = backends.get(name)
    unavailable = backend.unavailable_reason(device)
    if unavailable is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors: {unavailable}")
    reason = op.unsupported_reason(backend, call)
    if reason is None:
        return backend
    fall_back(name, op.what, reason)
    return reference


# The backend chosen under a check for each layer (backend="auto" where it measures, or a verified
# named backend), by the call's key, so that after the first call a layer's backend is one lookup away.
_checked_choice: dict[tuple, ModuleType] = {}


def _select_checked(op: _Op, name: str, call, shape) -> ModuleType:
    """_select, with the backend's result checked against the reference on the layer's first call.

    backend="auto" on a GPU runs, checks and times each candidate (autotune.choose, which keeps choices
    and exclusions on disk); a verified backend is run and checked, and replaced by the reference for
    the layer if it fails. A candidate runs into a new output, NaN-filled for its check (an element
    a kernel forgets to write then fails it).
    """
    device = call.device

    def choose(candidates: list[ModuleType], measure: bool | None) -> ModuleType:
        disagreement = op.checker(call)

        def check(candidate: str) -> str | None:
            if candidate == backends.REFERENCE:
                return None  # the reference itself, what the others are checked against
            return disagreement(op.run_into_scratch(backends.get(candidate), call, shape, True))

        runs = {b.NAME: functools.partial(op.run_into_scratch, b, call, shape, False) for b in candidates}
        return backends.get(autotune.choose(device, call.describe(), runs, check, measure=measure))

    if name == "auto" and device.type in MEASURED_DEVICE_TYPES:
        return autotune.remember(
            _checked_choice, call.key, device, lambda: _select(op, name, call, lambda c: choose(c, None))
        )
    backend = _select(op, name, call)
    if backend is backends.get(backends.REFERENCE):
        return backend
    return autotune.remember(
        _checked_choice, (name, *call.key), device, lambda: choose([backend, backends.get(backends.REFERENCE)], False)
    )


# The backend that serves each layer where no check runs (backend="auto" on the CPU, or a named backend
# that serves the case), by the call's key and the registered backends: the answers that decide it depend
# on nothing else, and asking them again costs a visible share of a small layer's time. A fallback to the
# reference is never kept, so that it warns, or raises under STRICT, on every call as before.
_unchecked_choice: dict[tuple, ModuleType] = {}
MAX_UNCHECKED_CHOICES = 4096  # as ops.MAX_VALIDATED


def _select_unchecked(op: _Op, name: str, call) -> ModuleType:
    key = (op.what, name, backends.NAMES, call.key)
    backend = _unchecked_choice.get(key)
    if backend is None:
        backend = _select(op, name, call)
        if name == "auto" or backend.NAME == name:
            if len(_unchecked_choice) >= MAX_UNCHECKED_CHOICES:
                _unchecked_choice.clear()
            _unchecked_choice[key] = backend
    return backend


def select(op: _Op, name: str, call, shape=None) -> ModuleType:
    """The backend for this call (`name` as the ops' `backend` argument takes it), noted in the
    serving record. With `shape` (the output's), a checked choice may run candidates."""
    name, verify = backends.parse(name)
    checked = verify or (name == "auto" and call.device.type in MEASURED_DEVICE_TYPES)
    if shape is None or not checked:
        return note_serving(_select_unchecked(op, name, call))
    return note_serving(_select_checked(op, name, call, shape))


def writable_residual(backend: ModuleType, call: ConvCall, shape) -> bool:
    """Whether `backend` may write the conv's result of `shape` over call.residual: it can, the residual
    is laid out as that channels_last output, and it shares no memory with the input."""
    residual = call.residual
    return (
        getattr(backend, "WRITES_INTO_RESIDUAL", False)
        and residual.stride() == channels_last_strides(shape)
        and residual.untyped_storage().data_ptr() != call.x.untyped_storage().data_ptr()
    )


def conv2d_bias_act(call: ConvCall, shape, backend: str, residual_writable: bool = False) -> Tensor:
    """The conv call's channels_last output of `shape`, computed by the backend `backend` selects.
    `residual_writable`: the caller will not read call.residual again (see ops.conv2d_bias_act)."""
    if 0 in shape:
        return new_output(call.x, shape)
    chosen = select(CONV, backend, call, shape)
    if residual_writable and writable_residual(chosen, call, shape):
        out = call.residual  # a new output's pages would be faulted in afresh on each call; the residual's are warm
    else:
        out = preallocated(chosen, lambda: new_output(call.x, shape))
    return _as_output(chosen.conv2d_bias_act(out, call), out, call.x, shape)


def conv2d_preact(call: ConvCall, shape, backend: str) -> tuple[Tensor, Tensor]:
    """conv2d_preact's (y, z), both channels_last of `shape`."""
    out_preact = new_output(call.x, shape)
    if out_preact.numel() == 0:
        return new_output(call.x, shape), out_preact
    chosen = select(PREACT, backend, call, shape)
    out = preallocated(chosen, lambda: new_output(call.x, shape))
    result = chosen.conv2d_preact(out, out_preact, call)
    if result is None:
        return out, out_preact
    return _as_output(result[0], out, call.x, shape), _as_output(result[1], out_preact, call.x, shape)


def add_relu(call: AddReluCall, backend: str) -> Tensor:
    out = torch.empty_like(call.x)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if out.numel():
        select(ADD_RELU, backend, call, tuple(call.x.shape)).add_relu(out, call.x, call.y)
    return out


def forget(tensors) -> None:
    """Drops every copy the loaded backends keep of these tensors (packed or re-arranged weights): after
    an edit PyTorch counts nowhere (through `.data`, NumPy), the next call derives them afresh."""
    for tensor in tensors:
        for backend in list(backends._loaded.values()):
            if hasattr(backend, "forget"):
                backend.forget(tensor)
