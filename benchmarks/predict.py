"""Images per second of `predict` on the CPU, decoding included: eager vs fused with 0, 1 and 2 loader
worker processes, and the fused model on Ray Data with 1 and 2 actors.

    python benchmarks/predict.py [--arch resnet50] [--images 256] [--reps 3] [--batch 32] [--no-ray]

The images are JPEGs written first (--image-width x --image-height, smooth random content, so that
they compress and decode like photographs rather than like noise). Each job is the real one: a
DataLoader of ImageFiles (predict.predict_files) or a Ray Data pipeline (scale.predict_paths_on_ray)
writing CSV rows to a temporary file; each time covers the whole job, from the first file read to
the last row written (loader workers and Ray actors start inside it; Ray itself is started before).
The single-process jobs are timed round-robin over --reps rounds, then Ray is started and its jobs
are timed the same way (a running Ray's own processes would weigh on the single-process jobs).
Prints a Markdown table of medians (and the min and max of the rounds); the machine's load average
is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fused_resnet.predict import Predictor, load_model, predict_files
from fused_resnet.predict_output import open_output


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[str]:
    """`count` JPEGs of smooth random content: coarse random colours upsampled, with a little grain."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def time_job(job, folder: Path, predictor: Predictor, paths: list[str]) -> float:
    """Images per second of one whole job writing its rows to a fresh CSV file."""
    out = folder / "rows.csv"
    out.unlink(missing_ok=True)
    with open_output(out, predictor.column_names()) as output:
        start = time.perf_counter()
        counts = job(paths, predictor, output)
        seconds = time.perf_counter() - start
    if counts.images != len(paths) or counts.failed:
        raise RuntimeError(f"the job wrote {counts.images} rows, {counts.failed} failed, for {len(paths)} images")
    return len(paths) / seconds


def round_robin(jobs: dict, folder: Path, paths: list[str], reps: int) -> dict[str, list[float]]:
    """Images/s of each job in each of `reps` rounds, after one untimed run of each (warm-up: page
    cache, oneDNN's packed weights, Ray's worker pool)."""
    rates = {name: [] for name in jobs}
    for rep in range(reps + 1):
        for name, (job, predictor) in jobs.items():
            rate = time_job(job, folder, predictor, paths)
            if rep:
                rates[name].append(rate)
            print(f"  {'warm-up' if not rep else f'round {rep}'}: {name}: {rate:.1f} images/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-width", type=int, default=500)
    parser.add_argument("--image-height", type=int, default=375)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-ray", action="store_true", help="the single-process jobs only")
    args = parser.parse_args()

    cores = os.cpu_count()
    model = load_model(args.arch)
    print(
        f"{args.arch}, {args.images} JPEGs of {args.image_width}x{args.image_height}, preprocessing {model.preprocess}; "
        f"batch {args.batch}, {torch.get_num_threads()} torch threads in the main process, {cores} cores; "
        f"torch {torch.__version__}; load average at the start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    predictors = {"eager": Predictor(model, fuse=False), "fused": Predictor(model, fuse=True)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        paths = write_jpegs(folder / "images", args.images, args.image_width, args.image_height)
        jobs = {}
        for workers in args.workers:
            for kind in ("eager", "fused"):
                job = lambda p, pr, o, w=workers: predict_files(p, pr, o, batch_size=args.batch, workers=w)  # noqa: E731
                jobs[f"{kind}, {workers} loader worker{'s' * (workers != 1)}"] = (job, predictors[kind])
        rates = round_robin(jobs, folder, paths, args.reps)

        if not args.no_ray:
            import ray

            from fused_resnet.scale import predict_paths_on_ray

            ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            try:
                ray_jobs = {}
                for actors in args.actors:
                    job = lambda p, pr, o, a=actors: predict_paths_on_ray(p, pr, o, batch_size=args.batch, concurrency=a)  # noqa: E731
                    ray_jobs[f"fused, Ray Data, {actors} actor{'s' * (actors != 1)} of 1 CPU"] = (job, predictors["fused"])
                rates.update(round_robin(ray_jobs, folder, paths, args.reps))
            finally:
                ray.shutdown()

    baseline = statistics.median(rates[next(iter(rates))])
    print(f"\n| job | images/s (median of {args.reps}) | min | max | vs {next(iter(rates))} |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | {median / baseline:.2f}x |")
    print(
        f"\nOn {cores} cores every process shares the same cores: loader workers decode on the cores the model "
        "computes on, and each Ray actor has one core (one torch thread) where the single process has them all. "
        "What this can show is whether decoding overlaps inference and what Ray costs per image; it cannot show "
        "Ray scaling out, which needs more cores or machines than one model already keeps busy."
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
