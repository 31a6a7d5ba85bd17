"""Fuses the conv + BatchNorm + ReLU (and residual add + ReLU) of ResNets (torchvision, timm, and any
model built of conv -> BatchNorm chains) into one kernel per convolution, checks the fused model
against float64 eager, times it against eager PyTorch and torch.compile, and exports it.

    python -m fused_resnet                 fuse a random resnet50, check parity, time eager vs fused
    python -m fused_resnet run  [options]  the same, with options
    python -m fused_resnet bench [--peers ...]  time one model against eager, torch.compile, cuDNN
    python -m fused_resnet verify [options] parity of every architecture (or those named)
    python -m fused_resnet convert --out model.pt2|model.onnx [options]
                                           export a fused model (torchvision or timm weights, or random)
    python -m fused_resnet inspect --arch timm:resnet50d
                                           each conv + BN group: fused or not, and why not
    python -m fused_resnet predict IMAGES --arch ARCH [--out preds.csv] [--ray]
                                           classify or embed image files (on Ray Data with --ray)
    python -m fused_resnet serve --arch ARCH [--replicas N]
                                           an HTTP endpoint on 127.0.0.1 (Ray Serve) returning top-k
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import backends, peers, predict_cli, serve
from .convert import fuse
from .fusion_report import inspect as inspect_model
from .version import __version__
from .architectures import ARCHITECTURES, build, check_name, classifier_weight_key
from .export import ONNX_DTYPES, export_onnx, export_program, save_program
from .parity import parity, relative_error, top1_agreement
from .timing import quantiles, time_ms
from .cli_options import (
    ARCH_HELP, DTYPES, _arch, _at_least, _check_backend, _device, load_torchvision_weights,
)
from .usage import UsageError

# Fewer timed repetitions than this make p20 and p80 two of a handful of samples.
MIN_ITERS = 10
# A p20-p80 spread wider than this fraction of the median gets a warning under the timings.
WIDE_SPREAD = 0.10

EXIT_CODES = """exit codes:
  0  success (the parity checks, if any, passed)
  1  parity failure: the fused model (or the re-loaded export) does not match float64 eager
  2  usage error, reported in one line before any computing: an unknown architecture, a device
     that is not there (--device cuda without a GPU), a backend that cannot run on the device or
     in the dtype, a bad option value or weights file
"""


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line (argparse would print the whole usage before it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _defaults(args) -> None:
    """Fills the options left unset with what suits the device (a GPU gets fp16 and a real batch),
    then checks that the device and backend can do what was asked, before anything is computed."""
    args.device = _device(args.device)
    on_gpu = args.device.type == "cuda"
    if args.dtype is None:
        args.dtype = "float16" if on_gpu else "float32"
    if args.batch is None:
        args.batch = 64 if on_gpu else 4
    _check_backend(args.backend, args.device, args.dtype)


def _print_header(args, subject: str) -> None:
    """What run, bench and verify print first: versions, device, backends, extension, settings."""
    print(
        f"fused_resnet {__version__} | torch {torch.__version__} | device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
        + f" | backends available: {', '.join(backends.available(args.device))}"
    )
    print(backends.get("cuda").status())
    print(f"{subject}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.dtype}, backend {args.backend!r}", flush=True)


@torch.no_grad()
def check_parity(arch: str, args, generator: torch.Generator) -> tuple[object, float]:
    """Parity of the fused model against float64 eager, and its top-1 agreement with fp32 eager."""
    dtype = DTYPES[args.dtype]
    model = build(arch, generator).to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    reference = copy.deepcopy(model).double()(x.double())
    eager_fp32 = model(x)
    eager = eager_fp32 if dtype == torch.float32 else copy.deepcopy(model).to(dtype)(x.to(dtype))
    fused = fuse(model, backend=args.backend, dtype=dtype)
    ours = fused(x)
    return parity(ours, eager, reference), top1_agreement(ours, eager_fp32)


def run(args) -> int:
    _defaults(args)
    generator = torch.Generator().manual_seed(args.seed)
    _print_header(args, args.arch)

    result, agreement = check_parity(args.arch, args, generator)
    print(f"parity vs float64 eager: {result}; top-1 agreement with fp32 eager: {agreement:.1%}")

    time_peers(args, generator)
    return 0 if result.ok else 1


def time_peers(args, generator: torch.Generator) -> None:
    """Times fused_resnet and its peers on one random batch and prints a table, fastest ratio last."""
    dtype = DTYPES[args.dtype]
    model = build(args.arch, generator).to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device, dtype)
    names = args.peers or list(dict.fromkeys([*peers.EAGER, "cudnn fused", peers.of_backend(args.backend), "ours auto + CUDA graph"]))
    print(f"{'':30s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'img/s':>9s} {'vs eager':>8s}")
    baseline, noisy = None, []
    for name in names:
        reason = peers.unavailable_reason(name, args.device, dtype)
        if reason is not None:
            print(f"{name:30s} skipped: {reason}")
            continue
        run_peer = peers.build(name, model, dtype)
        p20, median, p80 = quantiles(time_ms(lambda: run_peer(x), args.device, iters=args.iters))
        baseline = baseline or median
        print(f"{name:30s} {median:10.2f} {p20:8.2f} {p80:8.2f} {args.batch / median * 1e3:9.1f} {baseline / median:7.2f}x", flush=True)
        if p80 - p20 > WIDE_SPREAD * median:
            noisy.append(f"{name} {(p80 - p20) / median:.0%}")
    if noisy:
        print(
            f"warning: p20-p80 spread over {WIDE_SPREAD:.0%} of the median ({', '.join(noisy)}): the machine was busy, "
            "and ratios within the spread are noise; rerun with more --iters on an idle machine"
        )


def bench(args) -> int:
    _defaults(args)
    _print_header(args, args.arch)
    time_peers(args, torch.Generator().manual_seed(args.seed))
    return 0


def verify(args) -> int:
    _defaults(args)
    archs = args.archs or list(ARCHITECTURES)
    _print_header(args, f"{len(archs)} architectures")
    generator = torch.Generator().manual_seed(args.seed)
    failures = 0
    for arch in archs:
        result, agreement = check_parity(arch, args, generator)
        failures += not result.ok
        print(f"{arch:20s} {result}; top-1 agreement {agreement:.1%}", flush=True)
    print(f"{failures} of {len(archs)} architectures failed parity")
    return 1 if failures else 0


# What each --lower-to makes of the fused ops, for the report.
LOWERED = {
    "aten": "aten ops (fused ops decomposed; runs without fused_resnet)",
    "triton": "our Triton kernels (the program loads with fused_resnet; an AOTInductor package runs without it)",
    "cuda": "the CUDA C++ extension's ops (runs where fused_resnet/_C*.so is loaded)",
}


def _artifact_runner(path: Path, aoti: bool):
    """A callable running the artifact written to `path`, and how it was loaded; None if it cannot be."""
    if aoti:
        return torch._inductor.aoti_load_package(str(path)), "torch._inductor.aoti_load_package"
    if path.suffix == ".pt2":
        return torch.export.load(path).module(), "torch.export.load"
    try:
        import onnxruntime
    except ImportError:
        return None, "onnxruntime is not installed"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).to(x.device)

    return run, "onnxruntime, CPUExecutionProvider"


@torch.no_grad()
def convert(args) -> int:
    out, dtype, device = Path(args.out), DTYPES[args.dtype], _device(args.device)
    if out.suffix not in (".pt2", ".onnx"):
        raise UsageError(f"--out {out}: unknown extension {out.suffix!r}; use .pt2 (torch.export) or .onnx")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: {out.parent} is not a directory this process can write to")
    if out.suffix == ".onnx":
        if dtype not in ONNX_DTYPES:
            raise UsageError(f"--dtype {args.dtype} cannot be written to ONNX, whose Conv takes no {args.dtype}")
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"writing ONNX needs {' and '.join(missing)}: pip install onnx onnxscript")
    if out.suffix == ".onnx" and (args.lower_to != "aten" or args.aoti):
        raise UsageError("--lower-to and --aoti apply to .pt2 outputs; ONNX holds standard operators only")
    if args.batch < 2:
        raise UsageError(f"--batch must be at least 2 (got {args.batch}): torch.export would fix the batch size")
    generator = torch.Generator().manual_seed(args.seed)
    if args.weights is None:
        model, source = build(args.arch, generator), "random weights, BatchNorm statistics randomised (no --weights)"
    else:
        model = load_torchvision_weights(args.arch, Path(args.weights))
        source = f"weights from {args.weights} ({model.state_dict()[classifier_weight_key(args.arch)].shape[0]} classes)"
    model = model.to(device)
    fused = fuse(model, dtype=dtype)
    size = args.image_size
    print(f"fused_resnet {__version__} | torch {torch.__version__} | {args.arch}, {args.dtype}, device {device}")
    print(f"model: {source}")

    example = torch.randn(args.batch, 3, size, size, generator=generator).to(device, dtype)
    if out.suffix == ".onnx":
        export_onnx(fused, (example,), out)
        what = "ONNX, standard operators only"
    else:
        try:
            program = export_program(fused, (example,), lower_to=args.lower_to)
        except ValueError as error:  # a lowering the device cannot run
            raise UsageError(f"--lower-to {args.lower_to}: {error}") from None
        if args.aoti:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out))
        else:
            save_program(program, out)
        what = ("AOTInductor package" if args.aoti else "torch.export program") + f" of {LOWERED[args.lower_to]}"
    print(f"wrote {out}: {what}; input (batch, 3, {size}, {size}) {args.dtype}, any batch size")

    run_artifact, how = _artifact_runner(out, args.aoti)
    if run_artifact is None:
        print(f"not re-loaded to check it: {how}")
        return 0
    # A batch other than the example's shows that the batch dimension stayed dynamic.
    reference, eager = copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    batches, results = (args.batch, args.batch + 1), []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)
        result = run_artifact(x)
        results.append((parity(result, eager(x), reference(x.double())), relative_error(result, fused(x))))
    ok = all(check.ok and difference <= check.bound for check, difference in results)
    worst = max((check for check, _ in results), key=lambda check: check.error)
    print(
        f"re-loaded {out} ({how}), ran random batches of {batches[0]} and {batches[1]}: "
        f"{'matches' if ok else 'DOES NOT MATCH'} the fused model (relative difference "
        f"{max(difference for _, difference in results):.1e}) and float64 eager ({worst})"
    )
    return 0 if ok else 1


def inspect(args) -> int:
    print(inspect_model(build(args.arch, torch.Generator().manual_seed(args.seed))))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on a GPU, else float32")
    parser.add_argument("--batch", type=_at_least(1), default=None, help="default: 64 on a GPU, 4 on the CPU")
    parser.add_argument("--image-size", type=_at_least(1), default=224)
    parser.add_argument("--backend", default="auto", choices=["auto", *backends.NAMES])
    parser.add_argument("--seed", type=int, default=0)


def _timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet50", type=_arch, metavar="ARCH", help=ARCH_HELP)
    parser.add_argument("--iters", type=_at_least(MIN_ITERS), default=20, help=f"timed repetitions per peer (at least {MIN_ITERS})")
    parser.add_argument("--peers", nargs="+", choices=list(peers.ALL), default=None, metavar="PEER", help=f"from: {', '.join(peers.ALL)}")
    _common(parser)


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archs", nargs="*", metavar="ARCH", help=f"default: all of {', '.join(ARCHITECTURES)}")
    _common(parser)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet50", type=_arch, metavar="ARCH", help=ARCH_HELP)
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="torch.save(model.state_dict()) of a torchvision or timm model of that architecture, any number of classes "
        "(default: random weights)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="model.pt2 (torch.export) or model.onnx")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=2, help="example batch to trace and check with (>= 2); the artifact takes any")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="the device the exported program runs on")
    parser.add_argument(
        "--lower-to",
        choices=list(LOWERED),
        default="aten",
        help="what the fused ops become in a .pt2 (see fused_resnet.export); triton and cuda need --device cuda",
    )
    parser.add_argument("--aoti", action="store_true", help="write an AOTInductor package (compiled for this machine) instead")
    parser.add_argument("--seed", type=int, default=0)


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet50", type=_arch, metavar="ARCH", help=ARCH_HELP)
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The command line: one row per subcommand. The first is what runs without one.
SUBCOMMANDS = (
    Subcommand("run", "fuse one model, check parity against float64 eager, time it against its peers (the default)", _timing_arguments, run),
    Subcommand("bench", "time one model against the peers named with --peers (eager, torch.compile, cuDNN, ours)", _timing_arguments, bench),
    Subcommand("verify", "parity of every architecture (or those named) against float64 eager", _verify_arguments, verify),
    Subcommand("convert", "export a fused model to .pt2 (torch.export) or .onnx, re-load it and check it", _convert_arguments, convert),
    Subcommand("inspect", "fuse one model and print each conv + BN group: fused or not, and why", _inspect_arguments, inspect),
    Subcommand(
        "predict", "classify or embed image files (folders, globs, lists) with a fused model; on Ray Data with --ray",
        predict_cli.add_arguments, predict_cli.run,
    ),
    Subcommand("serve", "serve a fused model over HTTP on 127.0.0.1 with Ray Serve (dynamic batching)", serve.add_arguments, serve.run),
)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m fused_resnet",
        description=__doc__.split("\n\n")[0] + f"\nWithout a subcommand, it runs `{SUBCOMMANDS[0].name}`.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", title="subcommands", metavar="SUBCOMMAND")
    for command in SUBCOMMANDS:
        command.add_arguments(commands.add_parser(
            command.name, help=command.help, description=command.help, epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ))
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [SUBCOMMANDS[0].name, *argv]
    args = parser.parse_args(argv)
    for arch in getattr(args, "archs", []):
        try:
            check_name(arch)
        except ValueError as error:
            commands.choices[args.command].error(str(error))
    try:
        return next(c for c in SUBCOMMANDS if c.name == args.command).run(args)
    except UsageError as error:
        commands.choices[args.command].error(str(error))


if __name__ == "__main__":
    sys.exit(main())
