"""End-to-end inference: throughput and latency of whole ResNets, ours against every peer, one run.

    python benchmarks/end_to_end.py --quick      # ResNet-50, fp16, batch 1 and 256 (a few minutes)
    python benchmarks/end_to_end.py              # resnet18/50/101, resnext50; batch 1..256; fp16/bf16/fp32

Peers (fused_resnet.peers): eager NCHW and channels_last, torch.compile (default, max-autotune with
freezing, reduce-overhead), cuDNN fused ops, and ours per backend and with a CUDA graph. Every peer's
output is also compared with fp32 eager on the same batch, so a fast wrong answer shows.
Writes benchmarks/results/end_to_end-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import environment, write  # noqa: E402

from fused_resnet import peers  # noqa: E402
from fused_resnet.architectures import build  # noqa: E402
from fused_resnet.parity import relative_error  # noqa: E402
from fused_resnet.timing import quantiles, time_ms  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COLUMNS = ["arch", "dtype", "batch", "peer", "median_ms", "p20_ms", "p80_ms", "img_per_s", "vs_eager", "vs_max_autotune", "error_vs_fp32"]


def measure(args, device) -> list[dict]:
    rows = []
    for arch in args.archs:
        model = build(arch, torch.Generator().manual_seed(0)).to(device)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            names = [p for p in args.peers if peers.unavailable_reason(p, device) is None]
            skipped = [p for p in args.peers if p not in names]
            if skipped:
                print(f"skipping on {device}: {', '.join(skipped)}", flush=True)
            runners = {name: peers.build(name, model, dtype) for name in names}
            for batch in args.batches:
                x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
                with torch.no_grad():
                    expected = model(x)
                x = x.to(dtype)
                group = []
                for name, run in runners.items():
                    with torch.no_grad():
                        error = relative_error(run(x).float(), expected)  # also the first (compiling) call
                    p20, median, p80 = quantiles(time_ms(lambda: run(x), device, iters=args.iters, warmup=args.warmup))
                    row = dict(arch=arch, dtype=dtype_name, batch=batch, peer=name, median_ms=median, p20_ms=p20, p80_ms=p80, img_per_s=batch / median * 1e3, error_vs_fp32=error)
                    group.append(row)
                    print(f"{arch} {dtype_name} batch {batch:4d} {name:28s} {median:9.3f} ms {row['img_per_s']:10.1f} img/s  error {error:.2e}", flush=True)
                by_peer = {r["peer"]: r["median_ms"] for r in group}
                for row in group:
                    for column, peer in (("vs_eager", "eager NCHW"), ("vs_max_autotune", "compile max-autotune+freezing")):
                        row[column] = by_peer[peer] / row["median_ms"] if peer in by_peer else None
                rows += group
            del runners
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def goals(rows: list[dict]) -> str:
    """The ResNet-50 fp16 goals, read off this run's rows."""
    lines = []

    def row(batch, peer):
        return next((r for r in rows if r["arch"] == "resnet50" and r["dtype"] == "float16" and r["batch"] == batch and r["peer"] == peer), None)

    for batch in (256, 1):
        ours = [r for r in rows if r["arch"] == "resnet50" and r["dtype"] == "float16" and r["batch"] == batch and r["peer"].startswith("ours")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        line = f"- ResNet-50 fp16 batch {batch}: best of ours is {best['peer']!r}, {best['median_ms']:.3f} ms, {best['img_per_s']:.0f} img/s"
        for peer in ("eager NCHW", "compile max-autotune+freezing", "compile reduce-overhead", "cudnn fused"):
            other = row(batch, peer)
            if other:
                line += f"; {other['median_ms'] / best['median_ms']:.2f}x {peer}"
        lines.append(line)
    return "\n".join(lines)


def chart(rows: list[dict]):
    def draw(path):
        import matplotlib.pyplot as plt

        chosen = [r for r in rows if r["dtype"] == rows[0]["dtype"] and r["arch"] == rows[0]["arch"]]
        batches = sorted({r["batch"] for r in chosen})
        names = list(dict.fromkeys(r["peer"] for r in chosen))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(batches) + 3), 4.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [next((r["img_per_s"] for r in chosen if r["batch"] == b and r["peer"] == name), 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("images / s")
        ax.set_title(f"{rows[0]['arch']} {rows[0]['dtype']} inference throughput")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return draw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "resnet101", "resnext50_32x4d"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128, 256])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--peers", nargs="+", choices=list(peers.ALL), default=list(peers.ALL))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ResNet-50, fp16, batch 1 and 256")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.archs, args.dtypes, args.batches = ["resnet50"], ["float16"], [1, 256]
    if device.type == "cpu":
        print("no GPU: timing on the CPU", flush=True)
    rows = measure(args, device)
    summary = goals(rows)
    print(summary)
    if not args.no_write:
        write("end_to_end", rows, COLUMNS, environment(device), summary, chart(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
