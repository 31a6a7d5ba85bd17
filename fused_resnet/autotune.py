"""backend="auto" on a GPU: time every candidate backend once per layer, keep the fastest.

A candidate that raises, or whose output fails a check (backend="auto" checks each against the
reference backend, see fused_resnet.self_check), is excluded for that layer with one warning.
Choices and exclusions are keyed by the layer (shapes, strides, dtype, conv arguments) and stored on
disk per GPU and software versions, so a model is measured and checked once per machine and then
reused deterministically.
The file is $FUSED_RESNET_CACHE_DIR/autotune.json (default ~/.cache/fused_resnet). Set
FUSED_RESNET_AUTOTUNE=0 to skip measuring and take the first candidate in preference order.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .timing import time_ms
from .version import __version__

_lock = threading.RLock()
# environment (environment_key: one per GPU model) -> layer key -> {"choice": name, "rejected": {name: why}}
_choices: dict[str, dict[str, dict]] = {}
_warned: set[tuple[str, str]] = set()  # (layer key, candidate) excluded and warned about
_progress = None


def enabled() -> bool:
    return os.environ.get("FUSED_RESNET_AUTOTUNE", "1") != "0"


def cache_file() -> Path:
    root = os.environ.get("FUSED_RESNET_CACHE_DIR") or Path.home() / ".cache" / "fused_resnet"
    return Path(root) / "autotune.json"


def environment_key(device: torch.device) -> str:
    """What a measurement depends on besides the layer: the GPU and the software that runs on it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (
        f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"triton {triton_version} | fused_resnet {__version__}"
    )


def _load(device: torch.device) -> dict[str, dict]:
    """The choices for `device`'s environment: a machine may hold GPUs of different models."""
    environment = environment_key(device)
    if environment not in _choices:
        try:
            stored = json.loads(cache_file().read_text())
        except (OSError, ValueError):
            stored = {}
        # Entries of another shape (a bare name, from before exclusions were stored) are measured again.
        _choices[environment] = {k: v for k, v in stored.get(environment, {}).items() if isinstance(v, dict)}
    return _choices[environment]


def _save(device: torch.device) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        stored[environment_key(device)] = _load(device)
        # Write then rename, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(stored, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass  # an unwritable cache costs a re-measurement next time, nothing more


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    # Two warm-up calls: the first may compile or autotune a kernel.
    return statistics.median(time_ms(fn, device, iters=5, warmup=2))


def _tick() -> None:
    global _progress
    try:
        from tqdm import tqdm
    except ImportError:
        return
    if _progress is None:
        _progress = tqdm(desc="fused_resnet: tuning layers", unit=" layer", leave=False)
    _progress.update(1)


def _on(device: torch.device):
    """`device` as the current CUDA device: CUDA events and streams, and launches that do not follow
    their tensors' device, would otherwise time or run the layer on the current device (cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _evaluate(name: str, run: Callable[[], object], check, device: torch.device, measure: bool) -> float | str:
    """A candidate's median time in ms (0.0 when not measuring), or why it cannot be used: it
    raises, or `check` rejects it."""
    try:
        if check is not None:
            reason = check(name)
            if reason is not None:
                return reason
        return _median_ms(run, device) if measure else 0.0
    except Exception as error:  # a candidate that fails is excluded: it must not take the model down
        return f"{type(error).__name__}: {error}"


def _warn_excluded(key: str, name: str, reason: str) -> None:
    if (key, name) in _warned:
        return
    _warned.add((key, name))
    warnings.warn(f"fused_resnet: backend {name!r} excluded for layer [{key}]: {reason}", stacklevel=4)


def choose(
    device: torch.device,
    key: str,
    candidates: dict[str, Callable[[], object]],
    check: Callable[[str], str | None] | None = None,
    measure: bool | None = None,
) -> str:
    """The name of the fastest usable candidate for `key`, found on first sight and remembered.

    `candidates` maps names, in preference order, to calls that run the layer. A candidate is usable
    when it runs without raising and `check(name)`, if given, passes it: the check runs the candidate
    on its own and says why its result is wrong (None when it is right). The others are excluded for
    this layer, warned about once, and stored as excluded with the choice. Without measuring (`measure`
    False, or None and FUSED_RESNET_AUTOTUNE=0) the first usable candidate is taken, and nothing is
    read or stored (without `check`: the first, not even run). While a CUDA graph is being captured
    nothing can run outside it: the stored choice is used, else the first candidate, or with `check`
    the last (the reference the others are checked against).
    """
    names = list(candidates)
    measure = enabled() if measure is None else measure
    if len(names) == 1 or (check is None and not measure):
        return names[0]
    with _lock, _on(device):
        stored = _load(device).get(key, {}) if measure else {}
        if stored.get("choice") in candidates:
            return stored["choice"]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return names[-1 if check else 0]
        rejected = {name: why for name, why in stored.get("rejected", {}).items() if name in candidates}
        times = {}
        for name in names:
            result = rejected.get(name) or _evaluate(name, candidates[name], check, device, measure)
            if isinstance(result, str):
                rejected[name] = result
                _warn_excluded(key, name, result)
                continue
            times[name] = result
            if not measure:
                break
        if not times:
            raise RuntimeError(
                f"fused_resnet: no backend can compute layer [{key}]: "
                + "; ".join(f"{name}: {why}" for name, why in rejected.items())
            )
        best = min(times, key=times.__getitem__)  # the first in preference order among equals
        if measure:  # a choice made without measuring must not outlive FUSED_RESNET_AUTOTUNE=0
            _load(device)[key] = {"choice": best, "rejected": rejected}
            _save(device)
            _tick()
        return best


def remember(memo: dict, key, device: torch.device, compute: Callable[[], object]):
    """`memo[key]`, else `compute()` (which may measure), kept in `memo` for the next call: a choice
    looked up once per call on the launch path. A choice made during a CUDA graph capture is not kept:
    nothing could be timed then."""
    value = memo.get(key)
    if value is None:
        value = compute()
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            memo[key] = value
    return value


def forget() -> None:
    """Drops the in-memory choices (the file stays); the next lookup reloads it."""
    with _lock:
        _choices.clear()
