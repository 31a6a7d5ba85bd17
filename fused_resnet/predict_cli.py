"""`python -m fused_resnet predict`: its options and its job, in one process or on Ray Data (scale.py).
The options that pick the model are shared with `serve`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from . import backends
from .cli_options import ARCH_HELP, DTYPES, _arch, _at_least, _check_backend, _device
from .predict import Predictor, compare_with_eager, image_paths, load_model, predict_files
from .predict_output import open_output, output_format
from .scale import connected, predict_paths_on_ray
from .usage import require
from .version import __version__


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and prepare the model: shared by `predict` and `serve`."""

    parser.add_argument("--arch", required=True, type=_arch, metavar="ARCH", help=ARCH_HELP)
    parser.add_argument(
        "--weights", metavar="FILE", help="torch.save(model.state_dict()) of that architecture (default: random weights)"
    )
    parser.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--backend", default="auto", choices=["auto", *backends.NAMES])
    parser.add_argument("--crop-size", type=positive_int, metavar="N", help="the model's input size (default: its own, e.g. 224)")
    parser.add_argument(
        "--resize-size", type=positive_int, metavar="N", help="resize the shorter side to N before the crop (default: in the model's proportion)"
    )
    parser.add_argument("--seed", type=int, default=0, help="for random weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES", help="folders (recursive), globs, image files, or list files (one path a line, or a CSV's path column)"
    )
    add_model_arguments(parser)
    parser.add_argument("--out", metavar="FILE", help="predictions .csv (default), .jsonl or .parquet; embeddings .npy (default), .parquet or .jsonl")
    parser.add_argument("--embeddings", action="store_true", help="write the pooled features instead of the top-k classes")
    parser.add_argument("--batch", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--workers", type=non_negative_int, default=min(4, max(1, (os.cpu_count() or 2) // 2)), help="loader worker processes that decode (default: half the cores, 1 to 4; 0: decode in the main process)"
    )
    parser.add_argument("--eager", action="store_true", help="run the model unfused (eager PyTorch), to compare")
    parser.add_argument(
        "--compare-eager", nargs="?", type=positive_int, const=64, default=0, metavar="N", help="first run eager and fused on N images (default 64) and report their agreement"
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="keep what --out holds and skip those images")
    resume.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal only anyway)")
    scale = parser.add_argument_group("Ray Data (pip install \"fused_resnet[ray]\")")
    scale.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS", help="run on Ray Data: a local Ray (no address) or the cluster at ADDRESS"
    )
    scale.add_argument("--concurrency", type=positive_int, default=1, help="Ray actors that run the model (default 1)")
    scale.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs (and torch threads) per actor (default 1)")


# argparse types: the one the other subcommands use (cli_options._at_least).
positive_int = _at_least(1)
non_negative_int = _at_least(0)


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:

    device = _device(args.device)
    _check_backend(args.backend, device, args.dtype)
    return device, DTYPES[args.dtype]


def run(args) -> int:
    out = Path(args.out or ("embeddings.npy" if args.embeddings else "predictions.csv"))
    output_format(out, args.embeddings)  # a bad --out is refused before any work
    tqdm = None if args.no_progress else require("tqdm", "predict's progress bar (or --no-progress)").tqdm
    if args.ray:
        require("ray", "predict --ray")
    device, dtype = device_and_dtype(args)
    paths = image_paths(args.images)
    model = load_model(
        args.arch, args.weights, embeddings=args.embeddings, crop_size=args.crop_size, resize_size=args.resize_size, seed=args.seed
    )
    predictor = Predictor(model, topk=args.topk, fuse=not args.eager, backend=args.backend, dtype=dtype, device=device)
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(
            open_output(out, predictor.column_names(), width=model.width, resume=args.resume, overwrite=args.overwrite)
        )
        todo = [p for p in paths if p not in output.done]
        print(f"fused_resnet {__version__} | torch {torch.__version__} | {args.arch}, {args.dtype}, device {device}, "
              + ("eager (unfused)" if args.eager else f"fused, backend {args.backend!r}"))
        print(f"model: {model.source}")
        print(f"preprocessing: {model.preprocess}")
        skipped = f", {len(paths) - len(todo)} already in {out} (--resume)" if args.resume else ""
        print(f"images: {len(paths)}{skipped}; writing {'embeddings' if args.embeddings else f'top-{args.topk}'} to {out}", flush=True)
        if args.compare_eager and todo:
            print(compare_with_eager(predictor, todo, args.compare_eager), flush=True)
        if args.ray:

            stack.enter_context(connected(args.ray))  # before the progress bar, which would count Ray's start
        progress = stack.enter_context(tqdm(total=len(todo), unit="img", disable=None)) if tqdm is not None else None
        try:
            if args.ray:
                counts = predict_paths_on_ray(
                    todo, predictor, output, batch_size=args.batch, concurrency=args.concurrency, actor_cpus=args.actor_cpus,
                    progress=progress,
                )
                how = f"Ray Data, {args.concurrency} actor{'s' * (args.concurrency > 1)} of {args.actor_cpus:g} CPU"
            else:
                counts = predict_files(todo, predictor, output, batch_size=args.batch, workers=args.workers, progress=progress)
                how = f"{args.workers} loader worker{'s' * (args.workers != 1)}, batch {args.batch}"
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()  # the bar where it stopped, then why
            print(f"\ninterrupted: {out} keeps the rows written; the same command with --resume goes on from there", file=sys.stderr)
            return 130  # as a shell reports a process ended by Ctrl-C
    rate = counts.images / counts.seconds if counts.seconds > 0 else 0.0
    print(
        f"wrote {counts.images} rows to {out} in {counts.seconds:.1f} s ({rate:.1f} images/s, {how}): "
        f"{counts.images - counts.failed} predicted, {counts.failed} failed"
        + (" (their error is in the error column)" if counts.failed else "")
    )
    return 0

