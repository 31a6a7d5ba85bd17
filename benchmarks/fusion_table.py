"""Per model: BatchNorm modules before -> batch-norm ops at run time after fr.fuse, error against float64
eager (parity rule), and eager vs fused CPU time, fp32.

    python benchmarks/fusion_table.py [--batch 8] [--image-size 224] [--threads 2] [--models timm:resnet50 ...]

Prints a Markdown table. Times are medians of torch.utils.benchmark.Timer runs, measured in one process
one model after the other; the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch.utils import benchmark

import fused_resnet as fr
from fused_resnet import cpu_isa
from fused_resnet.architectures import OTHER_MODELS, build
from fused_resnet.fold import BN_TYPES
from fused_resnet.fusion_report import batch_norm_ops
from fused_resnet.parity import parity

MODELS = [
    *(f"timm:{name}" for name in (
        "resnet18", "resnet50", "resnet50c", "resnet50d", "resnet26t", "seresnet50", "ecaresnet50d",
        "resnext50_32x4d", "resnetv2_50",
    )),
    *OTHER_MODELS,
]  # fmt: skip


def _first_output(result):
    return next(iter(result.values())) if isinstance(result, dict) else result


def median_ms(model, x, runs: int) -> float:
    timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        model(x)  # warm-up
        return timer.timeit(runs).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32 CPU (oneDNN at {cpu_isa.describe()}), batch {args.batch}, {args.image_size}x{args.image_size}, {args.threads} threads, median of {args.runs}")
    print("| model | BN modules -> BN ops after | error vs float64 (eager's) | parity | eager ms | fused ms | eager/fused | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model = build(name, torch.Generator().manual_seed(0))
        fused = fr.fuse(model, backend="torch")
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = _first_output(copy.deepcopy(model).double()(x.double()))
            check = parity(_first_output(fused(x)), _first_output(model(x)), ref)
        before = sum(isinstance(m, BN_TYPES) for m in model.modules())
        eager_ms, fused_ms = median_ms(model, x, args.runs), median_ms(fused, x, args.runs)
        print(
            f"| {name} | {before} -> {batch_norm_ops(fused, x)} | {check.error:.2e} ({check.eager_error:.2e}) | "
            f"{'ok' if check.ok else 'FAIL'} | {eager_ms:.0f} | {fused_ms:.0f} | {eager_ms / fused_ms:.2f}x | "
            f"{os.getloadavg()[0]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
