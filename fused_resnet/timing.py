"""Wall-clock timing of a forward pass: CUDA events on a GPU, perf_counter on the CPU; warm-up first."""

from __future__ import annotations

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


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) of a list of times."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return cuts[1], statistics.median(times), cuts[7]
