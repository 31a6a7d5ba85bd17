"""Which memory format a fused module hands back: eager's, unless only fused modules will read it.

A fused conv computes in channels_last. Eager's conv returns NCHW for an NCHW input, and code outside
the fused modules (a `.view`, a returned feature map, a hook) must see what eager gives. Converting at
every boundary between two fused modules costs two copies (back to NCHW, then to channels_last in the
next one), so a fused module returns its channels_last result as it is when three things hold:

- at fuse time, the traced model showed that only fused modules read this output (layout_plan.py); the
  plan lives in the closest module whose forward calls the producer and all its readers (the
  *ancestor*), keyed by a token the producer holds;
- at this call, that ancestor's forward is running in this thread, below it the modules between it and
  the producer and readers are still the same objects (no module replaced or inserted), and no hook
  (forward, pre, backward; global, or of any of those modules) could see the tensor;
- nothing is being traced (torch.fx, torch.export, torch.compile record one layout for every input).

A reader then no longer sees eager's layout on its input, so the producer notes it, per thread, with a
weak reference to the very tensor it returned: `reader_input(x, note)` answers for that tensor
and for no other. When a producer must return eager's layout but fused modules also read its output,
it notes the channels_last original as the returned tensor's *twin*, which those readers use while the
returned tensor is unchanged (same object, same version), instead of converting it back. The twin
lives as long as the returned tensor does.
"""

from __future__ import annotations

import operator
import sys
import threading
import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from .memory_format import is_channels_last, plain_run, to_channels_last, to_nchw
from .ops import has_global_hooks, has_hooks

PLAN_ATTRIBUTE = "_fused_layout_plan"  # on an ancestor module: {StayToken: Stay}
_MAX_FRAMES = 64  # how far up the call stack the ancestor's forward is looked for


def in_layout(t: Tensor, channels_last: bool) -> Tensor:
    return to_channels_last(t) if channels_last else to_nchw(t)


class _Slot:
    """What one thread's last call of a producer returned."""

    __slots__ = ("returned", "version", "twins", "channels_last", "__weakref__")

    def __init__(self):
        self.returned: tuple = ()  # weak references to the returned tensors
        self.version: tuple = ()
        self.twins: tuple = ()  # channels_last originals of converted outputs (or None each)
        self.channels_last = False


class LayoutNote:
    """A producer's per-thread record of the tensors it last returned and eager's layout for them.

    Holds no tensor it returned (weak references), only the channels_last twins of converted outputs,
    which are dropped with the returned tensor they stand for."""

    def __init__(self):
        self._local = threading.local()

    def __getstate__(self):
        return {}  # per-thread, per-process records: a copy starts empty

    def __setstate__(self, state):
        self._local = threading.local()

    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Slot()
        return slot

    def record(self, returned: tuple[Tensor, ...], channels_last: bool, twins: tuple | None = None) -> None:
        slot = self._slot()
        if twins is None:
            slot.returned = tuple(map(weakref.ref, returned))
        else:
            drop = weakref.ref(slot)

            def forget_twins(_ref, drop=drop):  # the returned tensor died: its twin is of no use any more
                held = drop()
                if held is not None:
                    held.twins = ()

            slot.returned = tuple(weakref.ref(t, forget_twins) for t in returned)
        # Inference tensors count no versions: nothing shows an in-place write to them, so no twin stands in.
        slot.version = tuple(None if t.is_inference() else t._version for t in returned)
        slot.twins = twins if twins is not None and None not in slot.version else ()
        slot.channels_last = channels_last

    def lookup(self, x: Tensor) -> tuple[bool, Tensor | None] | None:
        """(eager's layout is channels_last, the channels_last twin or None) if `x` is a tensor this
        thread's last call returned, unchanged since; else None."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            return None
        for i, ref in enumerate(slot.returned):
            if ref() is x:
                if slot.version[i] is not None and x._version != slot.version[i]:
                    return None
                twin = slot.twins[i] if i < len(slot.twins) else None
                return slot.channels_last, twin
        return None


def reader_input(x: Tensor, note: LayoutNote | None) -> tuple[Tensor, bool | None]:
    """A fused reader's input as it computes on it (the channels_last twin where one is noted) and, where
    the producer noted it, whether eager's layout for it is channels_last (None: as `x`'s own)."""
    found = note.lookup(x) if note is not None and isinstance(x, Tensor) and plain_run() else None
    if found is None:
        return x, None
    channels_last, twin = found
    return (x if twin is None else twin), channels_last


def in_eager_layout(t, note: LayoutNote | None):
    """`t` as eager's code would read it: a tensor a producer kept in channels_last where eager's is NCHW
    comes back NCHW (for an op of the model's own, which may give its output the layout of its input)."""
    if not isinstance(t, Tensor):
        return t
    _, channels_last = reader_input(t, note)
    return to_nchw(t) if channels_last is False and is_channels_last(t) else t


class StayToken:
    """What a producer holds to find its plan in its ancestor. A copy of the producer alone holds a new
    token, which no ancestor knows: it returns eager's layout."""


def _unchanged(module: nn.Module, children: tuple, forward) -> bool:
    current = module._modules
    if len(current) != len(children) or module.__dict__.get("forward") is not forward:
        return False
    return all(map(operator.is_, current.values(), children))


@dataclass
class Stay:
    """A producer's plan, held by its ancestor: the modules whose hooks could see its output (forward or
    backward), and each module from the ancestor down to the producer and readers with the children and
    the instance forward (if any) it had when planned. The ancestor's own are kept apart: the plan holds
    no reference to the module that holds it."""

    watched: tuple[nn.Module, ...]
    containers: tuple[tuple[nn.Module, tuple, object], ...]  # below the ancestor: (module, children, forward)
    children: tuple  # the ancestor's
    forward: object = None  # the ancestor's instance forward, if it had one

    def holds(self, ancestor: nn.Module) -> bool:
        if has_global_hooks() or any(map(has_hooks, self.watched)):
            return False
        return _unchanged(ancestor, self.children, self.forward) and all(_unchanged(*c) for c in self.containers)


def may_stay_channels_last(token: StayToken | None) -> bool:
    """Whether the producer holding `token` may return its channels_last result now (see the module
    docstring). Called from the producer's forward."""
    if token is None or not plain_run():
        return False
    frame = sys._getframe(3)  # the producer's caller: above this function, _eager_output and the producer's forward
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return False
        if frame.f_code.co_name == "forward":
            module = frame.f_locals.get("self")
            plan = getattr(module, "__dict__", {}).get(PLAN_ATTRIBUTE) if isinstance(module, nn.Module) else None
            if plan is not None and token in plan:
                return plan[token].holds(module)
        frame = frame.f_back
    return False


class LayoutMixin:
    """The layout rule for a fused module whose `output_layout` is "as_eager". Attributes set by
    layout_plan.py; class defaults keep modules made by hand (or pickled before) returning eager's layout."""

    _x_note: LayoutNote | None = None  # the producer's note for the tensor this module reads as x
    _residual_note: LayoutNote | None = None  # ... and as the residual
    _note: LayoutNote | None = None  # this module's own note, when fused modules read its output
    _stay: StayToken | None = None  # when only fused modules read it

    def _eager_output(self, outputs: tuple[Tensor, ...], x: Tensor, channels_last: bool | None, may_stay: bool = True) -> tuple[Tensor, ...]:
        """`outputs` (channels_last) as this module returns them, eager's layout being `channels_last`
        (None: that of the input `x`)."""
        if channels_last is None:
            channels_last = is_channels_last(x)
        note = self._note
        if channels_last or note is None:
            return tuple(in_layout(t, channels_last) for t in outputs)
        if may_stay and may_stay_channels_last(self._stay):
            note.record(outputs, False)
            return outputs
        returned = tuple(to_nchw(t) for t in outputs)
        if plain_run():
            note.record(returned, False, twins=outputs)
        return returned
