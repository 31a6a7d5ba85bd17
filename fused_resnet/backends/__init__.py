"""The backends: one module per way of computing the fused ops, all listed in BACKENDS.

Which backend serves a call (selection, fallback, checks) is decided above this package, in
fused_resnet.dispatch; this package only knows the backends and loads them. Adding one is one row in
BACKENDS and one module with the names below (README.md beside this file says how).

Every backend module exposes the same names, so that dispatch treats them alike. A conv call arrives
as one fused_resnet.call.ConvCall `call` (x, weight, bias, residual, stride, padding, dilation,
groups, relu, and scale/shift for conv2d_preact), validated before a backend sees it.

    NAME: str
    unavailable_reason(device) -> str | None
        None when the backend can run on tensors of `device` at all; otherwise why not (extension not
        built, no GPU, Triton missing...). Asking for an unavailable backend is an error.
    conv_unsupported_reason(call) -> str | None
        None when this backend computes that case; otherwise why not. An unsupported but valid case
        falls back to the reference backend with a one-time warning.
    conv2d_bias_act(out, call) -> Tensor | None
        Writes act(conv2d(x, weight) + bias + residual) into `out`, a preallocated channels_last tensor
        of shape (N, Cout, OH, OW) and x's dtype. `x`, `residual` may have any strides. A backend whose
        library allocates its own result sets ALLOCATES_OUTPUT = True: it gets out=None and returns its
        result, which the op keeps when it is channels_last and copies otherwise. A backend that sets
        WRITES_INTO_RESIDUAL = True may be given out=call.residual (when the caller allows it and x does
        not share its memory): it then writes the result over the residual.
    preact_unsupported_reason(call) -> str | None
    conv2d_preact(out, out_preact, call) -> tuple[Tensor, Tensor] | None
        Writes y = conv2d(x, weight) + bias + residual into `out` and z = relu(y * scale + shift) into
        `out_preact`, both preallocated channels_last tensors (`out` is None for an ALLOCATES_OUTPUT
        backend), or returns its own (y, z), kept when channels_last and copied otherwise.
    add_relu_unsupported_reason(x, y) -> str | None
    add_relu(out, x, y) -> None
        Writes relu(x + y) into `out` (same shape and dtype as x and y, x's strides).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Backend:
    name: str  # what `backend=` takes
    module: str  # the module that implements it
    auto_device_types: tuple[str, ...]  # where backend="auto" takes it as a candidate, in BACKENDS order
    peer: str = ""  # its name in the benchmarks; default "ours <name>"

    @property
    def peer_name(self) -> str:
        return self.peer or f"ours {self.name}"


# Preference order for backend="auto": the first that is available and serves a case wins (on a GPU,
# the fastest of those that pass the self-check). On the CPU, oneDNN, else the reference; Triton runs
# on the CPU only through its slow interpreter.
BACKENDS: list[Backend] = [
    Backend("cuda", "fused_resnet.backends.cuda", ("cuda",)),
    Backend("triton", "fused_resnet.backends.triton", ("cuda",)),
    Backend("cudnn", "fused_resnet.backends.cudnn", ("cuda",), peer="cudnn fused"),
    Backend("onednn", "fused_resnet.backends.onednn", ("cpu",)),
    Backend("torch", "fused_resnet.backends.reference", ("cpu", "cuda")),
]
NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
REFERENCE = "torch"  # the backend every other one is checked against, and falls back to

_loaded: dict[str, ModuleType] = {}
# Guards the first import of a backend against concurrent callers; later calls only read `_loaded`.
# Reentrant, in case importing a backend module asks for a backend.
_lock = threading.RLock()


def register(backend: Backend, *, before: str = REFERENCE) -> None:
    """Adds a backend to BACKENDS, ahead of `before` in the "auto" order (default: just before the reference)."""
    global NAMES
    with _lock:
        if backend.name in NAMES or backend.name == "auto" or backend.name.startswith(_VERIFIED):
            raise ValueError(f"a backend named {backend.name!r} exists already or the name is reserved")
        BACKENDS.insert(NAMES.index(before), backend)
        NAMES = tuple(b.name for b in BACKENDS)


def unregister(name: str) -> None:
    global NAMES
    with _lock:
        BACKENDS[:] = [b for b in BACKENDS if b.name != name]
        NAMES = tuple(b.name for b in BACKENDS)
        _loaded.pop(name, None)


def entry(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"unknown backend {name!r}; supported backends are {', '.join(repr(n) for n in NAMES)} and 'auto'")


def get(name: str) -> ModuleType:
    """The backend module called `name` (one of NAMES)."""
    module = _loaded.get(name)
    if module is None:
        path = entry(name).module
        with _lock:
            module = _loaded.get(name)
            if module is None:
                module = _loaded[name] = importlib.import_module(path)
    return module


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The candidates of backend="auto" on `device`, in preference order."""
    return tuple(b.name for b in BACKENDS if device.type in b.auto_device_types)


def available(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on `device`."""
    device = torch.device(device)
    return [name for name in NAMES if get(name).unavailable_reason(device) is None]


# A `backend` argument of the ops that starts with this runs the named backend with its result checked
# against the reference on each layer's first call (see verified()).
_VERIFIED = "verified:"


def verified(name: str) -> str:
    """The `backend` argument that runs backend `name` with each layer's first result checked against
    the reference backend under the parity rule; a layer whose result fails (or raises) is computed
    by the reference from then on, with a warning. For "auto", the backend it takes where it does not
    measure (on a GPU it checks every candidate anyway). The reference needs no check."""
    return name if name == REFERENCE or name.startswith(_VERIFIED) else _VERIFIED + name


def parse(name: str) -> tuple[str, bool]:
    """A `backend` argument as (backend name, whether its results are verified)."""
    if name.startswith(_VERIFIED):
        return name.removeprefix(_VERIFIED), True
    return name, False


def check_name(name: str) -> None:
    """Raises ValueError unless `name` is a backend argument the ops take."""
    name = parse(name)[0]
    if name != "auto":
        entry(name)
