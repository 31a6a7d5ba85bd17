"""Per layer: every distinct convolution of ResNet-50, ours per backend against cuDNN, one run.

    python benchmarks/per_layer.py               # batch 1 and 256, fp16, channels_last
    python benchmarks/per_layer.py --batches 64 --dtype bfloat16

For each layer: cuDNN's bare conv (no bias, no epilogue), eager conv + BN + ReLU (+ add) as
torchvision runs it, and fused_resnet's conv2d_bias_act per backend. Times are GPU time per call,
taken from CUDA graph replays, so that host overhead (which end_to_end.py measures, with and
without a CUDA graph) does not hide the kernels at batch 1. Achieved TFLOP/s and GB/s are
set against the device's own ceilings, measured in the same run (a large bf16 matmul, a large
device-to-device copy). Writes benchmarks/results/per_layer-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import environment, write  # noqa: E402

import fused_resnet as fr  # noqa: E402
from fused_resnet import backends, ops  # noqa: E402
from fused_resnet.architectures import build  # noqa: E402
from fused_resnet.call import ConvCall  # noqa: E402
from fused_resnet.parity import relative_error  # noqa: E402
from fused_resnet.timing import graph_time_ms, quantiles, time_ms  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COLUMNS = ["batch", "layer", "count", "impl", "median_us", "tflops", "gbps", "pct_peak_flops", "pct_peak_bw", "vs_cudnn_conv", "error", "kernel"]


def distinct_layers(batch: int, image_size: int) -> list[dict]:
    """Each distinct fused conv of ResNet-50 at this batch: shapes, conv arguments, epilogue, and count."""
    fused = fr.fuse(build("resnet50"), backend="torch")
    seen: dict[tuple, dict] = {}

    def hook(module, args, kwargs, output):
        x, residual = args[0], (args[1] if len(args) > 1 else kwargs.get("residual"))
        key = (tuple(x.shape), tuple(module.weight.shape), module.stride, module.padding, module.groups, module.relu, residual is not None)
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = dict(x_shape=tuple(x.shape), w_shape=tuple(module.weight.shape), stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups, relu=module.relu, residual=residual is not None, out_shape=tuple(output.shape), count=1)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in fused.modules() if isinstance(m, fr.FusedConv2d)]
    with torch.no_grad():
        fused(torch.randn(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    layers = list(seen.values())
    for layer in layers:  # recorded at batch 1 (cheap on the CPU); scale to the benchmark batch
        layer["x_shape"] = (batch, *layer["x_shape"][1:])
        layer["out_shape"] = (batch, *layer["out_shape"][1:])
    return layers


def name_of(layer: dict) -> str:
    n, c, h, w = layer["x_shape"]
    cout, _, r, s = layer["w_shape"]
    epilogue = "+res+relu" if layer["residual"] else ("+relu" if layer["relu"] else "")
    groups = f" g{layer['groups']}" if layer["groups"] > 1 else ""
    return f"{c}x{h}x{w}->{cout} {r}x{s}/{layer['stride'][0]}{groups}{epilogue}"


def ceilings(device: torch.device) -> tuple[float, float]:
    """(TFLOP/s of a large bf16 matmul, GB/s of a large device-to-device copy counting read + write)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    _, matmul_ms, _ = quantiles(time_ms(lambda: a @ b, device, iters=20, warmup=5))
    src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    _, copy_ms, _ = quantiles(time_ms(lambda: dst.copy_(src), device, iters=20, warmup=5))
    return 2 * 8192**3 / matmul_ms / 1e9, 2 * src.numel() * src.element_size() / copy_ms / 1e6


def measure(args, device) -> tuple[list[dict], tuple[float, float]]:
    dtype = DTYPES[args.dtype]
    peak_tflops, peak_gbps = ceilings(device)
    print(f"ceilings: bf16 matmul {peak_tflops:.0f} TFLOP/s, copy {peak_gbps:.0f} GB/s", flush=True)
    ours = [b for b in backends.available(device) if b != "cudnn"]
    rows = []
    for batch in args.batches:
        for layer in distinct_layers(batch, args.image_size):
            gen = torch.Generator(device=device).manual_seed(0)
            rand = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(dtype)  # noqa: E731
            x = rand(*layer["x_shape"]).contiguous(memory_format=torch.channels_last)
            w = (rand(*layer["w_shape"]) / math.sqrt(math.prod(layer["w_shape"][1:]))).contiguous(memory_format=torch.channels_last)
            bias = rand(layer["w_shape"][0])
            residual = rand(*layer["out_shape"]).contiguous(memory_format=torch.channels_last) if layer["residual"] else None
            bn_mean, bn_var = rand(layer["w_shape"][0]), rand(layer["w_shape"][0]).abs() + 0.5
            conv = dict(stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"], groups=layer["groups"])

            def eager():
                y = F.batch_norm(F.conv2d(x, w, None, **conv), bn_mean, bn_var, None, bias, False, 0.0, 1e-5)
                if residual is not None:
                    y = y + residual
                return F.relu(y) if layer["relu"] else y

            impls = {"cudnn conv": lambda: F.conv2d(x, w, None, **conv), "eager conv+bn+act": eager}
            impls.update({f"ours {b}": (lambda b=b: ops.conv2d_bias_act(x, w, bias, residual, relu=layer["relu"], backend=b, **conv)) for b in [*ours, "cudnn"] if b in backends.available(device)})
            with torch.no_grad():
                expected = ops.conv2d_bias_act(x.double(), w.double(), bias.double(), None if residual is None else residual.double(), relu=layer["relu"], backend="torch", **conv)
            n, cout, oh, ow = layer["out_shape"]
            flops = 2 * n * oh * ow * cout * math.prod(layer["w_shape"][1:])
            nbytes = (x.numel() + w.numel() + n * cout * oh * ow * (2 if residual is not None else 1)) * x.element_size()
            group = []
            for impl, run in impls.items():
                error = relative_error(run(), expected) if impl.startswith("ours") else None
                _, median, _ = quantiles(graph_time_ms(run, device, iters=args.iters, warmup=3))
                tflops, gbps = flops / median / 1e9, nbytes / median / 1e6
                # Which compiled kernel the CUDA C++ backend measured fastest (CUTLASS 2.x or Hopper).
                kernel = backends.get("cuda").chosen_kernel(ConvCall.of(x, w, bias, residual, relu=layer["relu"], **conv)) if impl == "ours cuda" else None
                group.append(dict(batch=batch, layer=name_of(layer), count=layer["count"], impl=impl, median_us=median * 1e3, tflops=tflops, gbps=gbps, pct_peak_flops=100 * tflops / peak_tflops, pct_peak_bw=100 * gbps / peak_gbps, error=error, kernel=kernel))
            cudnn_us = group[0]["median_us"]
            for row in group:
                row["vs_cudnn_conv"] = cudnn_us / row["median_us"]
                print(f"batch {batch:4d} {row['layer']:34s} {row['impl']:18s} {row['median_us']:9.1f} us {row['tflops']:7.1f} TFLOP/s {row['vs_cudnn_conv']:5.2f}x cuDNN", flush=True)
            rows += group
    return rows, (peak_tflops, peak_gbps)


def summary(rows: list[dict], peaks: tuple[float, float]) -> str:
    lines = [f"Ceilings measured in this run: bf16 matmul {peaks[0]:.0f} TFLOP/s, device copy {peaks[1]:.0f} GB/s.", ""]
    for batch in sorted({r["batch"] for r in rows}):
        for impl in sorted({r["impl"] for r in rows if r["impl"].startswith("ours")}):
            ratios = [r["vs_cudnn_conv"] for r in rows if r["batch"] == batch and r["impl"] == impl]
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            losers = [r["layer"] for r in rows if r["batch"] == batch and r["impl"] == impl and r["vs_cudnn_conv"] < 1.0]
            lines.append(f"- batch {batch}, {impl}: geomean {geomean:.2f}x cuDNN bare conv over {len(ratios)} layers; slower than cuDNN on {len(losers)}: {', '.join(losers) or 'none'}")
    return "\n".join(lines)


def chart(rows: list[dict]):
    def draw(path):
        import matplotlib.pyplot as plt

        batches = sorted({r["batch"] for r in rows})
        fig, axes = plt.subplots(len(batches), 1, figsize=(12, 4 * len(batches)), squeeze=False)
        for ax, batch in zip(axes[:, 0], batches):
            layers = list(dict.fromkeys(r["layer"] for r in rows if r["batch"] == batch))
            impls = list(dict.fromkeys(r["impl"] for r in rows if r["batch"] == batch and r["impl"] != "cudnn conv"))
            width = 0.8 / len(impls)
            for i, impl in enumerate(impls):
                values = [next((r["vs_cudnn_conv"] for r in rows if r["batch"] == batch and r["layer"] == layer and r["impl"] == impl), 0) for layer in layers]
                ax.bar([j + i * width for j in range(len(layers))], values, width, label=impl)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(layers)), layers, rotation=75, fontsize=6)
            ax.set_ylabel("speed vs cuDNN bare conv")
            ax.set_title(f"ResNet-50 convolutions, batch {batch}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    return draw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("per_layer needs a CUDA GPU (it compares against cuDNN)")
        return 2
    device = torch.device("cuda")
    rows, peaks = measure(args, device)
    text = summary(rows, peaks)
    print(text)
    if not args.no_write:
        write("per_layer", rows, COLUMNS, environment(device), text, chart(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
