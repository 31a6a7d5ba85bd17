"""Command line.

    python -m fused_resnet                 fuse a random resnet50, check parity, time eager vs fused
    python -m fused_resnet run  [options]  the same, with options
    python -m fused_resnet verify [options] parity of every architecture (or those named)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import fused_resnet as fr

from . import backends
from .architectures import ARCHITECTURES, build
from .parity import parity, top1_agreement
from .timing import quantiles, time_ms

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _defaults(args) -> None:
    """Fills the options left unset with what suits the device: a GPU gets fp16 and a real batch."""
    args.device = _device(args.device)
    on_gpu = args.device.type == "cuda"
    if args.dtype is None:
        args.dtype = "float16" if on_gpu else "float32"
    if args.batch is None:
        args.batch = 64 if on_gpu else 4


@torch.no_grad()
def check_parity(arch: str, args, generator: torch.Generator) -> tuple[object, float]:
    """Parity of the fused model against float64 eager, and its top-1 agreement with fp32 eager."""
    dtype = DTYPES[args.dtype]
    model = build(arch, generator).to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    reference = copy.deepcopy(model).double()(x.double())
    eager_fp32 = model(x)
    eager = eager_fp32 if dtype == torch.float32 else copy.deepcopy(model).to(dtype)(x.to(dtype))
    fused = fr.fuse(model, backend=args.backend, dtype=dtype)
    ours = fused(x)
    return parity(ours, eager, reference), top1_agreement(ours, eager_fp32)


def run(args) -> int:
    _defaults(args)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"fused_resnet {fr.__version__} | torch {torch.__version__} | device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
        + f" | backends available: {', '.join(backends.available(args.device))}"
    )
    print(f"{args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.dtype}, backend {args.backend!r}")

    result, agreement = check_parity(args.arch, args, generator)
    print(f"parity vs float64 eager: {result}; top-1 agreement with fp32 eager: {agreement:.1%}")

    model = build(args.arch, generator).to(device=args.device, dtype=dtype)
    fused = fr.fuse(model, backend=args.backend)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device, dtype)
    x_channels_last = x.contiguous(memory_format=torch.channels_last)
    model_channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    candidates = {
        "eager NCHW": lambda: model(x),
        "eager channels_last": lambda: model_channels_last(x_channels_last),
        f"fused ({args.backend})": lambda: fused(x),
    }
    print(f"{'':24s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'img/s':>9s} {'vs eager':>8s}")
    baseline = None
    for name, fn in candidates.items():
        p20, median, p80 = quantiles(time_ms(fn, args.device, iters=args.iters))
        baseline = baseline or median
        print(f"{name:24s} {median:10.2f} {p20:8.2f} {p80:8.2f} {args.batch / median * 1e3:9.1f} {baseline / median:7.2f}x")
    return 0 if result.ok else 1


def verify(args) -> int:
    _defaults(args)
    generator = torch.Generator().manual_seed(args.seed)
    failures = 0
    for arch in args.archs or list(ARCHITECTURES):
        result, agreement = check_parity(arch, args, generator)
        failures += not result.ok
        print(f"{arch:20s} {result}; top-1 agreement {agreement:.1%}", flush=True)
    print(f"{failures} of {len(args.archs or ARCHITECTURES)} architectures failed parity")
    return 1 if failures else 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on a GPU, else float32")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on a GPU, 4 on the CPU")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backend", default="auto", choices=["auto", *backends.NAMES])
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser("run", help="fuse one model, check parity, time eager vs fused (the default)")
    run_parser.add_argument("--arch", default="resnet50", choices=list(ARCHITECTURES))
    run_parser.add_argument("--iters", type=int, default=10)
    _common(run_parser)
    verify_parser = commands.add_parser("verify", help="parity of every architecture against float64 eager")
    verify_parser.add_argument("archs", nargs="*", metavar="ARCH", help=f"default: all of {', '.join(ARCHITECTURES)}")
    _common(verify_parser)

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    unknown = [arch for arch in getattr(args, "archs", []) if arch not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture {unknown[0]!r}; known: {', '.join(ARCHITECTURES)}")
    return {"run": run, "verify": verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
