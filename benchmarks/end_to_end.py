"""End-to-end inference: throughput and latency of whole ResNets, ours against every peer, one run.

    python benchmarks/end_to_end.py --quick                # GPU: ResNet-50, fp16, batch 1 and 256 (a few minutes)
    python benchmarks/end_to_end.py --device cpu --quick   # CPU: resnet18/50, batch 1 and 8, fp32 and bf16
    python benchmarks/end_to_end.py                        # resnet18/50/101, resnext50; batch 1..256; fp16/bf16/fp32

Peers (fused_resnet.peers): eager NCHW and channels_last, BN folded by torch.fx, torch.compile
(default, with freezing, max-autotune with freezing, reduce-overhead), cuDNN fused ops, and ours per
backend and with a CUDA graph; on the CPU the set in peers.CPU, with ONNX Runtime and OpenVINO where
they are installed (pip install onnxruntime openvino; a missing one is skipped with its reason).
Peers are timed round-robin, so a busy spell of a shared machine falls on all of them alike; medians
with their p20-p80 spread. Each peer's setup (built from the model, then its first call: compilation,
export, or for ours fr.fuse to first output) is timed separately, with Inductor's caches emptied for each compile (in memory and on disk) so compile times are not cache hits.
Every peer's output is also compared with fp32 eager and with float64 eager on the same batch, so a
fast wrong answer shows. A CPU run states the instruction-set level oneDNN runs at (fused_resnet.cpu_isa).
Writes benchmarks/results/end_to_end-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import environment, write  # noqa: E402

from fused_resnet import cpu_isa, peers  # noqa: E402
from fused_resnet.architectures import build  # noqa: E402
from fused_resnet.parity import relative_error  # noqa: E402
from fused_resnet.timing import interleaved_ms, quantiles  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COLUMNS = [
    "arch", "dtype", "batch", "peer", "median_ms", "p20_ms", "p80_ms", "spread", "img_per_s",
    "vs_eager", "vs_freezing", "vs_max_autotune", "vs_onnxruntime", "vs_openvino", "setup_s", "error_vs_fp32", "error_vs_fp64",
]
# Ratio columns: the peer's median time over ours (> 1: the row is faster than that peer).
RATIOS = {
    "vs_eager": "eager NCHW", "vs_freezing": "compile freezing", "vs_max_autotune": "compile max-autotune+freezing",
    "vs_onnxruntime": "ONNX Runtime", "vs_openvino": "OpenVINO",
}
MAX_SPREAD = 0.10


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def set_up(name, model, dtype, x, device):
    """Builds peer `name` and makes its first call (compilation, tuning): (run, output, seconds)."""
    start = time.perf_counter()
    run = peers.build(name, model, dtype)
    out = run(x)
    _synchronize(device)
    return run, out, time.perf_counter() - start


def measure(args, device) -> list[dict]:
    rows = []
    for arch in args.archs:
        model = build(arch, torch.Generator().manual_seed(0)).to(device)
        exact_model = copy.deepcopy(model).double()
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            reasons = {p: peers.unavailable_reason(p, device, dtype) for p in args.peers}
            names = [p for p, reason in reasons.items() if reason is None]
            for p, reason in reasons.items():
                if reason is not None:
                    print(f"skipping {p} on {device} in {dtype_name}: {reason}", flush=True)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
                with torch.no_grad():
                    expected = model(x)
                    exact = exact_model(x.double())
                x = x.to(dtype)
                # Built per batch size: a compiled peer compiles once, for this shape, in its setup.
                # Dynamo forgets the earlier cells' graphs first: every model shares ResNet.forward,
                # and past its recompile limit Dynamo would run the later cells' peers uncompiled.
                torch._dynamo.reset()
                runners, group = {}, []
                for name in names:
                    run, out, setup_s = set_up(name, model, dtype, x, device)
                    runners[name] = run
                    errors = dict(error_vs_fp32=relative_error(out.float(), expected), error_vs_fp64=relative_error(out.double(), exact))
                    group.append(dict(arch=arch, dtype=dtype_name, batch=batch, peer=name, setup_s=setup_s, **errors))
                times = interleaved_ms({name: (lambda run=run: run(x)) for name, run in runners.items()}, device, reps=args.reps, warmup=args.warmup)
                for row in group:
                    p20, median, p80 = quantiles(times[row["peer"]])
                    row.update(median_ms=median, p20_ms=p20, p80_ms=p80, spread=(p80 - p20) / median, img_per_s=batch / median * 1e3)
                by_peer = {r["peer"]: r["median_ms"] for r in group}
                for row in group:
                    for column, peer in RATIOS.items():
                        row[column] = by_peer[peer] / row["median_ms"] if peer in by_peer else None
                    print(
                        f"{arch} {dtype_name} batch {batch:4d} {row['peer']:30s} {row['median_ms']:9.3f} ms "
                        f"(p20-p80 {row['spread']:5.1%}) {row['img_per_s']:9.1f} img/s  {_ratios(row)}"
                        f"setup {row['setup_s']:6.2f} s  error vs fp32 {row['error_vs_fp32']:.2e}, vs fp64 {row['error_vs_fp64']:.2e}",
                        flush=True,
                    )
                    if row["spread"] > MAX_SPREAD:
                        print(f"  warning: p20-p80 spread {row['spread']:.1%} is above {MAX_SPREAD:.0%}: the machine was busy; re-run it quiet", flush=True)
                rows += group
                del runners
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def _ratios(row) -> str:
    return "".join(f"{row[c]:5.2f}x {c}  " for c in RATIOS if row[c] is not None)


def cpu_goals(rows: list[dict]) -> str:
    """Ours against Inductor with freezing in every cell (and ONNX Runtime and OpenVINO where they ran, with
    their error against float64 beside ours), and fr.fuse-to-first-output against Inductor's compile time."""
    lines = []
    cells = dict.fromkeys((r["arch"], r["dtype"], r["batch"]) for r in rows)
    for arch, dtype, batch in cells:
        cell = {r["peer"]: r for r in rows if (r["arch"], r["dtype"], r["batch"]) == (arch, dtype, batch)}
        ours, frozen = cell.get("ours auto"), cell.get("compile freezing")
        if ours is None or frozen is None:
            continue
        engines = "".join(
            f", {ours[column]:.2f}x {peer} ({cell[peer]['median_ms']:.1f} ms, error vs fp64 {cell[peer]['error_vs_fp64']:.1e})"
            for column, peer in RATIOS.items()
            if peer in peers.ENGINES and peer in cell
        )
        lines.append(
            f"- {arch} {dtype} batch {batch}: ours {ours['median_ms']:.1f} ms (error vs fp64 {ours['error_vs_fp64']:.1e}) = "
            f"{ours['vs_freezing']:.2f}x Inductor freezing ({frozen['median_ms']:.1f} ms), {ours['vs_eager']:.2f}x eager NCHW{engines}; "
            f"fr.fuse to first output {ours['setup_s']:.2f} s "
            f"= {ours['setup_s'] / frozen['setup_s']:.1%} of Inductor's compile + first call ({frozen['setup_s']:.1f} s)"
        )
    noisy = sum(r["spread"] > MAX_SPREAD for r in rows)
    if noisy:
        lines.append(f"- {noisy} of {len(rows)} rows had a p20-p80 spread above {MAX_SPREAD:.0%}")
    return "\n".join(lines)


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


def _computed_here(dtypes: list[str]) -> list[str]:
    """The default CPU dtypes without those oneDNN has no convolution for at its level here (a CPU
    without AVX-512, or ONEDNN_MAX_CPU_ISA below it): every peer would run PyTorch's generic kernels,
    many times slower than float32, and fr.fuse says so. Asked for with --dtypes, they still run."""
    kept = []
    for name in dtypes:
        if DTYPES[name] != torch.float32 and cpu_isa.onednn_computes(DTYPES[name]) is False:
            print(f"skipping {name}: {cpu_isa.missing_reason(DTYPES[name])} (--dtypes {name} runs it anyway)", flush=True)
        else:
            kept.append(name)
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "resnet101", "resnext50_32x4d"])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8 32 128 256 (GPU), 1 8 (CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default: all (GPU), float32 bfloat16 (CPU)")
    parser.add_argument("--peers", nargs="+", choices=list(peers.ALL), default=None, help="default: all (GPU), peers.CPU (CPU)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=20, help="round-robin rounds: timed samples per peer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every peer (default: torch's); recorded with the run")
    parser.add_argument("--quick", action="store_true", help="GPU: ResNet-50, fp16, batch 1 and 256; CPU: resnet18/50, batch 1 and 8, fp32 and bf16")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = parser.parse_args(argv)
    dtypes_given = args.dtypes is not None
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device.type == "cpu"
    args.batches = args.batches or ([1, 8] if on_cpu else [1, 8, 32, 128, 256])
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if on_cpu else list(DTYPES))
    args.peers = args.peers or list(peers.CPU if on_cpu else peers.ALL)
    if args.quick:
        args.archs, args.dtypes, args.batches = (
            (["resnet18", "resnet50"], ["float32", "bfloat16"], [1, 8]) if on_cpu else (["resnet50"], ["float16"], [1, 256])
        )
    if on_cpu and not dtypes_given:
        args.dtypes = _computed_here(args.dtypes)
    # Compile times as on a fresh machine: Inductor's caches start empty in every run.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cache-"))
    if on_cpu:
        print(f"timing on the CPU with {torch.get_num_threads()} threads; oneDNN runs at {cpu_isa.describe()}", flush=True)
    env = environment(device)  # before measuring: the load average and commit the run started with
    rows = measure(args, device)
    summary = cpu_goals(rows) if on_cpu else goals(rows)
    print(summary)
    if not args.no_write:
        write("end_to_end", rows, COLUMNS, env, summary, chart(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
