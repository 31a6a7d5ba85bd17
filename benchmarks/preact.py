"""A pre-activation ResNet (timm resnetv2_50) fused with and without the pre-activation chains on the CPU.

    python benchmarks/preact.py [--batch 8] [--threads 2] [--reps 15] [--dtypes float32 bfloat16]

"without" is fr.fuse with the graph pass's "preact_..." patterns left out: each block's BatchNorm + ReLU
that reads the residual stream then runs as its own module, as before conv2d_preact existed. Both models
are built and timed in one process, round-robin (fused_resnet.timing.interleaved_ms), per dtype; the
machine's load average is printed at the start and the end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os

import torch

import fused_resnet as fr
from fused_resnet import cpu_isa, graph_fuse
from fused_resnet.architectures import build
from fused_resnet.fusion_report import batch_norm_ops
from fused_resnet.parity import parity
from fused_resnet.timing import interleaved_ms, quantiles


@contextlib.contextmanager
def without_preact_chains():
    patterns = graph_fuse.PATTERNS
    graph_fuse.PATTERNS = tuple(p for p in patterns if not any(k.startswith("preact_") for k in p))
    try:
        yield
    finally:
        graph_fuse.PATTERNS = patterns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="timm:resnetv2_50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.threads} threads, "
          f"backend {args.backend!r}, {args.reps} interleaved rounds; load average at the start "
          f"{os.getloadavg()[0]:.2f}, oneDNN at {cpu_isa.describe()}, torch {torch.__version__}")
    print("| dtype | fused | BN ops at run time | parity | median ms | p20 | p80 | without / with |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    model = build(args.arch, torch.Generator().manual_seed(0))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    for name in args.dtypes:
        dtype = getattr(torch, name)
        typed, xt = copy.deepcopy(model).to(dtype), x.to(dtype)
        with without_preact_chains():
            models = {"without preact chains": fr.fuse(typed, backend=args.backend)}
        models["with preact chains"] = fr.fuse(typed, backend=args.backend)
        with torch.no_grad():
            eager = typed(xt)
        checks = {k: parity(m(xt), eager, reference) for k, m in models.items()}
        times = interleaved_ms({k: (lambda m=m: m(xt)) for k, m in models.items()}, x.device, reps=args.reps)
        medians = {k: quantiles(t)[1] for k, t in times.items()}
        for k, m in models.items():
            p20, median, p80 = quantiles(times[k])
            ratio = medians["without preact chains"] / median
            print(f"| {name} | {k} | {batch_norm_ops(m, xt)} | {checks[k]} | {median:.1f} | {p20:.1f} | {p80:.1f} | "
                  f"{ratio:.3f}x |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
