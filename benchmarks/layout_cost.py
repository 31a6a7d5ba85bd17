"""What returning eager's memory format costs: a fused ResNet-50 feature extractor (its four stages'
outputs returned, as detection and segmentation backbones use it), fed NCHW images.

    python benchmarks/layout_cost.py [--batch 2] [--image-size 224] [--threads 2] [--rounds 15] [--pairs 400]

Times, round-robin in one process: the model fr.fuse returns (fused modules hand each other
channels_last tensors where only fused modules read them, and convert what the model returns to eager's
NCHW; fused_resnet/layout.py), the same model without that plan (its stages run nn.Sequential's loop and
every fused block converts its output to NCHW and the next one back), the same model with every fused
module left in channels_last (what it would cost without any conversion; its outputs then differ from
eager's in layout), and eager. Prints medians with p20-p80 and the cost of the conversions in percent,
from the medians and round by round. Then the two fused models alone, in `--pairs` paired rounds (each
timed call after an untimed one of the same model, the order alternating): the cost per pair, its mean
with its standard error, its 10%-trimmed mean and its median, which a machine that drifts by more than the
cost still shows. Last, the conversions' own time inside fr.fuse's forward (each conversion to eager's
layout timed where layout.py makes it), against the whole forward's, call by call: a direct measure,
not a difference of two totals.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import fused_resnet as fr
from fused_resnet import cpu_isa, layout
from fused_resnet.layout_plan import remove_plan
from fused_resnet.nn import FusedStage
from fused_resnet.parity import randomize_bn_
from fused_resnet.timing import interleaved_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = randomize_bn_(torchvision.models.resnet50().eval(), torch.Generator().manual_seed(0))
    model = IntermediateLayerGetter(backbone, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    as_eager = fr.fuse(model)
    unplanned = remove_plan(fr.fuse(model))
    for module in unplanned.modules():
        if type(module) is FusedStage:  # nn.Sequential's loop: each block called as a module, converting
            module.__class__ = nn.Sequential
    internal = fr.fuse(model)
    for module in internal.modules():
        if getattr(module, "output_layout", None) == "as_eager":
            module.output_layout = "channels_last"
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    peers = {
        "fused, eager's layouts (fr.fuse)": as_eager,
        "fused, converting at every boundary": unplanned,
        "fused, channels_last throughout": internal,
        "eager": model,
    }
    with torch.no_grad():
        samples = interleaved_ms({name: (lambda m=m: m(x)) for name, m in peers.items()}, torch.device("cpu"), reps=args.rounds)
    print(
        f"resnet50 features (layer1-4 returned), fp32, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{args.threads} threads, oneDNN at {cpu_isa.describe()}, {args.rounds} interleaved rounds, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    medians = {name: statistics.median(times) for name, times in samples.items()}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=5)
        print(f"  {name:36s} {medians[name]:8.1f} ms  (p20-p80 {q[0]:.1f}-{q[3]:.1f})")
    # Also per round: each round's ratio to the same round's channels_last-throughout sample, which a
    # machine's slow and fast spells (they last longer than a round) affect alike.
    baseline = samples["fused, channels_last throughout"]
    for name in ("fused, eager's layouts (fr.fuse)", "fused, converting at every boundary"):
        cost = medians[name] / medians["fused, channels_last throughout"] - 1
        ratios = [t / b for t, b in zip(samples[name], baseline)]
        q = statistics.quantiles(ratios, n=5)
        print(
            f"cost of returning eager's layouts, {name.removeprefix('fused, ')}: {cost:+.1%} by medians, "
            f"{statistics.median(ratios) - 1:+.1%} per round (p20-p80 {q[0] - 1:+.1%} to {q[3] - 1:+.1%})"
        )
    if args.pairs:
        with torch.no_grad():
            ratios = paired_ratios(as_eager, internal, x, args.pairs)
        print(
            f"cost of returning eager's layouts, {args.pairs} paired rounds of the two fused models: "
            f"{statistics.mean(ratios) - 1:+.2%} +- {statistics.stdev(ratios) / len(ratios) ** 0.5:.2%} (mean, standard error), "
            f"{trimmed_mean(ratios, 0.1) - 1:+.2%} (10%-trimmed mean), {statistics.median(ratios) - 1:+.2%} (median); "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        with torch.no_grad():
            shares, converted = conversion_shares(as_eager, x, args.pairs)
        q = statistics.quantiles(shares, n=5)
        print(
            f"conversions' own time inside fr.fuse's forward ({converted}), {args.pairs} calls: "
            f"{statistics.median(shares):.2%} of the forward (median; p20-p80 {q[0]:.2%} to {q[3]:.2%})"
        )


def paired_ratios(model, baseline, x, pairs: int) -> list[float]:
    """model's time over baseline's, pair by pair; each timed call follows an untimed one of the same model."""
    ratios = []
    for i in range(pairs + 5):
        times = {}
        for m in (model, baseline) if i % 2 else (baseline, model):
            m(x)
            start = time.perf_counter()
            m(x)
            times[m] = time.perf_counter() - start
        if i >= 5:  # warm-up
            ratios.append(times[model] / times[baseline])
    return ratios


def trimmed_mean(values: list[float], cut: float) -> float:
    """The mean of `values` without the lowest and highest `cut` of them (a spell of steal or a page-cache
    stall hits one call and moves a plain mean more than the cost being measured)."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.mean(ordered[k:len(ordered) - k])


def conversion_shares(model, x, calls: int) -> tuple[list[float], str]:
    """Per call of `model`: the time spent in layout.py's conversions to eager's layout over the call's
    time; and what was converted in one call."""
    spent, sizes = [], []
    conversions = {"to_nchw": layout.to_nchw, "to_channels_last": layout.to_channels_last}

    def timed(convert):
        def run(t):
            start = time.perf_counter()
            out = convert(t)
            spent.append(time.perf_counter() - start)
            sizes.append(tuple(t.shape))
            return out
        return run

    shares = []
    try:
        for name, convert in conversions.items():
            setattr(layout, name, timed(convert))
        for i in range(calls + 5):
            spent.clear()
            sizes.clear()
            start = time.perf_counter()
            model(x)
            total = time.perf_counter() - start
            if i >= 5:  # warm-up
                shares.append(sum(spent) / total)
    finally:
        for name, convert in conversions.items():
            setattr(layout, name, convert)
    return shares, f"{len(sizes)} copies: " + ", ".join("x".join(map(str, s)) for s in sizes)


if __name__ == "__main__":
    main()
