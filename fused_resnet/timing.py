"""Wall-clock timing of a forward pass: CUDA events on a GPU, perf_counter on the CPU; warm-up first."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


@torch.no_grad()
def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


@torch.no_grad()
def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 15, warmup: int = 2, min_sample_ms: float = 20.0
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, timed round-robin: each of `reps` rounds takes one
    sample of every function in turn, so a busy spell of a shared machine falls on all of them alike
    instead of on whichever happened to run then. A sample averages as many back-to-back calls as
    fill `min_sample_ms` (judged from the last warm-up call), so short calls are not timer noise.

    Before each sample, one untimed call of the same function lets it settle into its own steady
    state, as it runs when used alone: on the CPU the allocator hands memory freed by the function
    before back to the OS, and the first call after it pays page faults for that churn (4% of a
    ResNet-18 at batch 8 in one measurement, falling on whichever function came next)."""
    calls = {}
    for name, fn in fns.items():
        warm = time_ms(fn, device, iters=1, warmup=warmup - 1)[0] if warmup else 1.0
        calls[name] = max(1, math.ceil(min_sample_ms / max(warm, 1e-3)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            n = calls[name]
            fn()
            times[name].append(sum(time_ms(fn, device, iters=n, warmup=0)) / n)
    return times


@torch.no_grad()
def graph_time_ms(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3, calls: int = 10) -> list[float]:
    """GPU milliseconds per call of `fn`, without the host's share (Python, dispatch, launches).

    After `warmup` untimed calls (which compile and tune), `calls` back-to-back calls are captured
    into one CUDA graph; each of `iters` timed replays gives one sample, divided by `calls`. For
    comparing kernels: at small sizes a call's host overhead can exceed its kernels' time, and
    would otherwise be measured instead of them.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    # One warm-up replay: the first may upload the graph.
    return [ms / calls for ms in time_ms(graph.replay, device, iters=iters, warmup=1)]


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) of a list of times."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return cuts[1], statistics.median(times), cuts[7]
