"""Per model, what fr.fuse makes of it: every output against float64 eager (parity rule, eager's own
error beside ours), normalization ops at run time before -> after, what fr.inspect leaves unfused, and
eager vs fused CPU time, fp32. A model whose fusing or running raises gets a row saying so.

    python benchmarks/fusion_table.py [--batch 2] [--image-size 128] [--threads 2] [--models timm:resnet50 ...]

Prints a Markdown table. Times are medians of interleaved rounds of eager and fused (fused_resnet.timing),
in one process; the machine's load average is printed with them. Layouts are compared output by output.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import warnings

import torch
import torchvision.models as tvm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

import fused_resnet as fr
from fused_resnet import cpu_isa
from fused_resnet.architectures import OTHER_MODELS, build
from fused_resnet.fusion_report import NORM_OPS, batch_norm_ops
from fused_resnet.parity import parity, randomize_bn_
from fused_resnet.timing import interleaved_ms

TIMM = (
    # the ResNet family: stems and shortcuts (B, C, D, S, T), widths and depths, attention, anti-aliasing,
    # pre-activation, frozen BN
    "resnet10t", "resnet18", "resnet18d", "resnet26t", "resnet34", "resnet34d", "resnet50", "resnet50c", "resnet50d",
    "resnet50s", "resnet50t", "resnet50_gn", "resnet101d", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
    "seresnet50", "seresnext26d_32x4d", "ecaresnet50d", "legacy_seresnet18", "resnetrs50", "resnetblur50",
    "resnetaa50d", "resnetv2_50", "resnetv2_50d_gn", "skresnet18", "res2net50_26w_4s", "resnest14d",
    # other families built of conv -> BN
    "dla34", "hrnet_w18_small", "regnetx_002", "regnety_002", "efficientnet_b0", "mobilenetv3_small_100",
    "densenet121", "cspresnet50",
)
TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet50_dilated", "resnet50_frozen_bn")
# torchvision beyond classification: feature extractors, detection and segmentation backbones.
FEATURES = {
    "resnet50 create_feature_extractor": lambda: create_feature_extractor(
        tvm.resnet50(), {f"layer{i}": f"c{i + 1}" for i in range(1, 5)}
    ),
    "resnet50 IntermediateLayerGetter": lambda: IntermediateLayerGetter(tvm.resnet50(), {"layer2": "c3", "layer4": "c5"}),
    "fcn_resnet50": lambda: tvm.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5),
    "regnet_y_400mf": lambda: tvm.regnet_y_400mf(num_classes=10),
}
MODELS = [*(f"timm:{name}" for name in TIMM), *TORCHVISION, *OTHER_MODELS, *FEATURES]

def outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in outputs(v)]
    if isinstance(result, (list, tuple)):
        return [t for v in result for t in outputs(v)]
    return []


def median_ms(models: dict[str, torch.nn.Module], x, rounds: int) -> dict[str, float]:
    """Each model's median time per call, timed round-robin (fused_resnet.timing.interleaved_ms)."""
    samples = interleaved_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, torch.device("cpu"), reps=rounds)
    return {name: statistics.median(times) for name, times in samples.items()}


def row(name: str, args) -> str:
    if name in FEATURES:
        model = randomize_bn_(FEATURES[name]().eval(), torch.Generator().manual_seed(0))
    else:
        model = build(name, torch.Generator().manual_seed(0))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fr.fuse(model, backend=args.backend)
            report = fr.inspect(model)
    except Exception as error:
        return f"| {name} | fr.fuse raised {type(error).__name__}: {str(error)[:80]} | | | | | |"
    with torch.no_grad():
        eager_out, exact = outputs(model(x)), outputs(copy.deepcopy(model).double()(x.double()))
        try:
            ours = outputs(fused(x))
        except Exception as error:
            return f"| {name} | the fused model raised {type(error).__name__}: {str(error)[:80]} | | | | | |"
    checks = [parity(o, e, r) for o, e, r in zip(ours, eager_out, exact)]
    layouts = len(ours) == len(eager_out) and all(
        o.is_contiguous(memory_format=f) == e.is_contiguous(memory_format=f)
        for o, e in zip(ours, eager_out) for f in (torch.contiguous_format, torch.channels_last)
    )
    worst = max(checks, key=lambda c: c.error / c.bound)
    verdict = "ok" if all(c.ok for c in checks) and layouts else "FAIL" + ("" if layouts else " (layout)")
    times = median_ms({"eager": model, "fused": fused}, x, args.runs)
    eager_ms, fused_ms = times["eager"], times["fused"]
    left = ", ".join(sorted({g.pattern if g.pattern != "bn" else "BatchNorm" for g in report.unfused})) or "-"
    return (
        f"| {name} | {len(ours)} | {worst.error:.1e} ({worst.eager_error:.1e}) {verdict} | "
        f"{batch_norm_ops(model, x, ops=NORM_OPS)} -> {batch_norm_ops(fused, x, ops=NORM_OPS)} | {len(report.unfused)}: {left} | "
        f"{eager_ms / fused_ms:.2f}x ({eager_ms:.0f} / {fused_ms:.0f} ms) | {os.getloadavg()[0]:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds of eager and fused")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"fp32 CPU (oneDNN at {cpu_isa.describe()}), batch {args.batch}, {args.image_size}x{args.image_size}, {args.threads} threads, backend "
        f"{args.backend!r}, medians of {args.runs} interleaved rounds; torch {torch.__version__}, fused_resnet {fr.__version__}"
    )
    print("| model | outputs | worst error vs float64 (eager's), parity | norm ops eager -> fused | left unfused (fr.inspect) | eager/fused time | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        print(row(name, args), flush=True)


if __name__ == "__main__":
    main()
