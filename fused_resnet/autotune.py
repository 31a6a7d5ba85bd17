"""backend="auto" on a GPU: time every candidate backend once per layer, keep the fastest.

Choices are keyed by the layer (shapes, strides, dtype, conv arguments) and stored on disk per GPU
and software versions, so a model is measured once per machine and then reused deterministically.
The file is $FUSED_RESNET_CACHE_DIR/autotune.json (default ~/.cache/fused_resnet). Set
FUSED_RESNET_AUTOTUNE=0 to skip measuring and take the first candidate in preference order.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .timing import time_ms

_lock = threading.RLock()
_choices: dict[str, str] | None = None  # layer key -> backend name, for this machine's environment
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
    from . import __version__

    return (
        f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"triton {triton_version} | fused_resnet {__version__}"
    )


def layer_key(op: str, tensors, *args) -> str:
    parts = [op]
    for t in tensors:
        parts.append("-" if t is None else f"{tuple(t.shape)}/{t.stride()}/{str(t.dtype).removeprefix('torch.')}")
    parts.extend(str(a) for a in args)
    return " ".join(parts)


def _load(device: torch.device) -> dict[str, str]:
    global _choices
    if _choices is None:
        try:
            stored = json.loads(cache_file().read_text())
        except (OSError, ValueError):
            stored = {}
        _choices = dict(stored.get(environment_key(device), {}))
    return _choices


def _save(device: torch.device) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        stored[environment_key(device)] = _choices
        # Write then rename, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(stored, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass  # an unwritable cache costs a re-measurement next time, nothing more


def _median_ms(fn: Callable[[], object]) -> float:
    # Two warm-up calls: the first may compile or autotune a kernel.
    return statistics.median(time_ms(fn, torch.device("cuda"), iters=5, warmup=2))


def _tick() -> None:
    global _progress
    try:
        from tqdm import tqdm
    except ImportError:
        return
    if _progress is None:
        _progress = tqdm(desc="fused_resnet: tuning layers", unit=" layer", leave=False)
    _progress.update(1)


def choose(device: torch.device, key: str, candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest candidate for `key`, measured on first sight and remembered.

    `candidates` maps backend names, in preference order, to calls that run the layer. While a CUDA
    graph is being captured nothing can be timed: the stored choice or else the first candidate is used.
    """
    names = list(candidates)
    if len(names) == 1 or not enabled():
        return names[0]
    with _lock:
        stored = _load(device).get(key)
        if stored in candidates:
            return stored
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return names[0]
        times = {name: _median_ms(run) for name, run in candidates.items()}
        best = min(names, key=times.__getitem__)
        _choices[key] = best
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
    global _choices
    with _lock:
        _choices = None
