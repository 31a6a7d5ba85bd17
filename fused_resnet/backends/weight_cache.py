"""Tensors derived from a weight (a packed, re-arranged or cast copy), kept beside it and never stale.

A derived copy is used only while the weight has the same storage and the same version counter, dtype,
offset, shape and strides as when it was made. The entry holds the storage it was made from: while the
entry lives, no other storage can take that storage's place or address, so `.to(dtype)` and back,
`weight.data = ...`, `load_state_dict(assign=True)` or a swapped parameter never meet a copy of the old
values. In-place edits of the parameter (or of a `.detach()` of it), `copy_` and `load_state_dict` bump
the version. Writes PyTorch counts nowhere are not seen: through `weight.data`, which has a version
counter of its own, and through NumPy or DLPack views; after such an edit, forget() the weight
(`fused_resnet.refresh(model)` does it for a whole model).

Entries are found by the weight's id, hold it weakly (an id is reused once its tensor is gone, so the
entry names the tensor it was made for) and go away with it: a lookup creates nothing, where a
weak-keyed dictionary creates a weak reference on every one. Inference tensors have no version
counter: nothing derived from them is cached.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch


def _stamp(weight: torch.Tensor) -> tuple:
    return weight._version, weight.dtype, weight.storage_offset(), weight.shape, weight.stride()


@dataclass
class _Entry:
    weight: weakref.ref  # the tensor this entry is for
    stamp: tuple
    storage: torch.UntypedStorage  # held: see the module docstring
    derived: OrderedDict = field(default_factory=OrderedDict)  # key -> derived tensor, oldest first


class DerivedWeights:
    """Copies derived from weights, up to `per_weight` per weight (the oldest is dropped beyond it)."""

    def __init__(self, per_weight: int = 1):
        self.per_weight = per_weight
        self.made = 0  # how many copies were made: for benchmarks and tests
        self._entries: dict[int, _Entry] = {}  # by id(weight)
        self._lock = threading.Lock()

    def _current(self, weight: torch.Tensor, storage, stamp) -> _Entry | None:
        entry = self._entries.get(id(weight))
        if entry is not None and entry.weight() is weight and entry.storage is storage and entry.stamp == stamp:
            return entry
        return None

    def _drop(self, key: int, ref: weakref.ref) -> None:
        # Runs as the weight is freed, perhaps amid a locked section of this thread: no lock here. The
        # id cannot be taken again before the weight's memory is freed, after this returns.
        entry = self._entries.get(key)
        if entry is not None and entry.weight is ref:
            self._entries.pop(key, None)

    def get(self, weight: torch.Tensor, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The copy of `weight` under `key`, made by `make()` unless a current one is kept."""
        if weight.is_inference():
            return make()
        storage, stamp = weight.untyped_storage(), _stamp(weight)
        entry = self._current(weight, storage, stamp)
        if entry is not None:
            derived = entry.derived.get(key)
            if derived is not None:
                return derived
        with self._lock:
            entry = self._current(weight, storage, stamp)
            if entry is None:
                ref = weakref.ref(weight, lambda ref, key=id(weight): self._drop(key, ref))
                entry = self._entries[id(weight)] = _Entry(ref, stamp, storage)
            derived = entry.derived.get(key)
            if derived is None:
                while len(entry.derived) >= self.per_weight:
                    entry.derived.popitem(last=False)
                derived = entry.derived[key] = make()
                self.made += 1
        return derived

    def copies(self, weight: torch.Tensor) -> dict:
        """The copies kept for `weight`, by key (for tests and reports)."""
        entry = self._entries.get(id(weight))
        return {} if entry is None or entry.weight() is not weight else dict(entry.derived)

    def forget(self, weight: torch.Tensor) -> None:
        with self._lock:
            entry = self._entries.get(id(weight))
            if entry is not None and entry.weight() is weight:
                del self._entries[id(weight)]
