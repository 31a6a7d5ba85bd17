"""Serving with dynamic batching on the CPU: batch sizes drawn at random from 1-32, one after the other.

    python benchmarks/dynamic_batch.py [--arch resnet18] [--calls 60] [--threads 2] [--sizes 200]

Times, side by side in one process (round-robin per call, the same batch for each peer): the fused model,
eager channels_last and torch.compile(dynamic=True); counts the oneDNN weight repacks per call of the fused
model after warm-up. Then feeds `--sizes` distinct input sizes to a fresh fused model and reports how much
the process's resident memory grew (and eager's, in a separate process, for comparison).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torchvision

import fused_resnet as fr
from fused_resnet.backends import onednn
from fused_resnet.parity import randomize_bn_


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _CountRepacks:
    """Counts the oneDNN weight reorders the backend makes."""

    def __init__(self):
        self.count, self._reorder = 0, onednn._reorder_weight

    def __enter__(self):
        def counting(*args):
            self.count += 1
            return self._reorder(*args)

        onednn._reorder_weight = counting
        return self

    def __exit__(self, *exc):
        onednn._reorder_weight = self._reorder


def model_of(arch: str):
    return randomize_bn_(getattr(torchvision.models, arch)().eval(), torch.Generator().manual_seed(0))


def memory_growth(arch: str, sizes: int, eager: bool) -> float:
    """RSS growth in MB after `sizes` distinct input sizes (224 down by 2 pixels, batch 1 to 4)."""
    model = model_of(arch)
    run = model.to(memory_format=torch.channels_last) if eager else fr.fuse(model)
    with torch.no_grad():
        run(torch.randn(1, 3, 224, 224))
        before = _rss_mb()
        for i in range(sizes):
            side = 224 - 2 * (i % 60)
            run(torch.randn(1 + i % 4, 3, side, side).contiguous(memory_format=torch.channels_last))
    return _rss_mb() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, default=200)
    parser.add_argument("--memory-only", choices=["fused", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        print(f"{memory_growth(args.arch, args.sizes, args.memory_only == 'eager'):.0f}")
        return 0

    model = model_of(args.arch)
    eager = model.to(memory_format=torch.channels_last)
    fused = fr.fuse(model)
    compiled = torch.compile(eager, dynamic=True)
    peers = {"fused (ours)": fused, "eager channels_last": eager, "torch.compile dynamic": compiled}
    rng = random.Random(0)
    batches = [rng.randint(1, 32) for _ in range(args.calls)]
    times = {name: [] for name in peers}
    with torch.no_grad():
        for batch in (1, 7, 32):  # warm-up: compile, pack
            for run in peers.values():
                run(torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        with _CountRepacks() as repacks:
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
                for name, run in peers.items():
                    run(x)  # untimed: each peer finds the memory its predecessor freed warm
                    start = time.perf_counter()
                    run(x)
                    times[name].append((time.perf_counter() - start) * 1e3 / batch)
    print(
        f"{args.arch}, fp32, 224x224, {args.threads} threads, {args.calls} calls with batch sizes drawn from 1-32 "
        f"(seed 0), load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}"
    )
    print("| peer | median ms per image | p20-p80 | vs ours |")
    print("| --- | --- | --- | --- |")
    ours = statistics.median(times["fused (ours)"])
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=5)
        median = statistics.median(samples)
        print(f"| {name} | {median:.2f} | {q[0]:.2f}-{q[3]:.2f} | {median / ours:.2f}x |")
    print(f"oneDNN weight repacks after warm-up: {repacks.count} in {2 * len(batches)} fused calls")
    for which in ("fused", "eager"):
        out = subprocess.run(
            [sys.executable, __file__, "--arch", args.arch, "--threads", str(args.threads), "--sizes", str(args.sizes), "--memory-only", which],
            check=True, capture_output=True, text=True,
        )
        print(f"resident memory growth after {args.sizes} input sizes, {which}: {out.stdout.strip()} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
