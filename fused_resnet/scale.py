"""Batch inference on Ray Data: the predict job spread over Ray actors that each fuse the model once.

    python -m fused_resnet predict photos/ --arch resnet50 --ray [ADDRESS] --concurrency 2

    import ray
    from fused_resnet.predict import load_model
    from fused_resnet.scale import predict_dataset

    ds = ray.data.read_binary_files("photos/", include_paths=True)   # or read_images(..., include_paths=True)
    rows = predict_dataset(ds, load_model("resnet50", "resnet50.pt"), concurrency=4, batch_size=64)
    rows.write_parquet("predictions/")

The pipeline: rows with a `path` (and the file's `bytes`, or a decoded `image`, or neither: then the
file is read) -> preprocessing tasks (predict.read_image / decode and the model's own preprocessing; a
file that cannot be decoded keeps its error) -> `map_batches` with FusedPredictor, a callable class:
each actor unpickles the eager model, fuses it once (unpickling imports fused_resnet, which registers
its ops in that worker; the oneDNN weight packing is a cache each actor builds for itself) and runs
batches -> the columns of predict.Predictor, the same as the single-process job writes.

`ray.data.read_images` stops the whole job at the first file it cannot decode; the command line
therefore hands Ray the list of paths and decodes them itself, so that a bad file is one row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np
import torch

from .predict import Counts, Model, Predictor, decode, preprocessed, read_image
from .predict_output import Output
from .usage import require

FEATURE = "predict on Ray"


def _image(batch: dict, i: int) -> torch.Tensor:
    if "image" in batch:  # decoded by ray.data.read_images: (H, W, C) or (H, W) uint8
        image = torch.from_numpy(np.ascontiguousarray(batch["image"][i]))
        return image.expand(3, *image.shape) if image.dim() == 2 else image.permute(2, 0, 1)[:3]
    if "bytes" in batch:  # read by ray.data.read_binary_files
        return decode(batch["bytes"][i])
    return read_image(str(batch["path"][i]))


def preprocess_batch(batch: dict, preprocess) -> dict:
    """A batch of rows decoded and preprocessed into `pixels` (zeros where the image failed) and `error`."""
    results = [preprocessed(lambda i=i: _image(batch, i), preprocess) for i in range(len(batch["path"]))]
    pixels, errors = [p for p, _ in results], [e for _, e in results]
    shape = next((p.shape for p in pixels if p is not None), (3, 1, 1))
    stacked = torch.stack([p if p is not None else torch.zeros(shape) for p in pixels]) if pixels else torch.zeros(0, *shape)
    return {"path": np.asarray(batch["path"], dtype=object), "pixels": stacked.numpy(), "error": np.array(errors, dtype=object)}


class FusedPredictor:
    """The model of each Ray actor: fused once, when the actor starts; then a batch of pixels -> columns."""

    def __init__(self, model: Model, topk: int, backend: str, dtype: torch.dtype, device: str, fuse: bool, threads: int):
        torch.set_num_threads(threads)  # the actor's CPUs, not the whole machine's
        self.predictor = Predictor(model, topk=topk, fuse=fuse, backend=backend, dtype=dtype, device=device)
        self.predictor.module  # fuse now: the first batch should not pay for it

    def __call__(self, batch: dict) -> dict:
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])) if ok.any() else None
        return self.predictor.columns([str(p) for p in batch["path"]], errors, pixels)


def predict_dataset(
    ds,
    model: Model,
    *,
    topk: int = 5,
    batch_size: int = 32,
    concurrency: int = 1,
    actor_cpus: float = 1.0,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    fuse: bool = True,
    decode_concurrency: int | None = None,
):
    """A Ray Dataset of the predict columns (predict.Predictor) for each row of `ds`.

    `ds` has a `path` column and, optionally, `bytes` (read_binary_files) or `image` (read_images).
    `concurrency` actors of `actor_cpus` CPUs each (and as many torch threads) run the fused model
    on batches of `batch_size`. The preprocessing tasks ask Ray for no CPU, so that the actors may
    take every CPU of the cluster without starving them (their number is capped at
    `decode_concurrency`, default the cluster's CPUs); `fuse=False` runs the eager model instead.
    """
    ray = require("ray", FEATURE)
    if decode_concurrency is None:
        decode_concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
    Predictor(model, topk=topk)  # refuses a bad topk here, not in every actor
    pixels = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"preprocess": model.preprocess},
        batch_size=batch_size,
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=decode_concurrency),
    )
    return pixels.map_batches(
        FusedPredictor,
        fn_constructor_kwargs=dict(
            model=model, topk=topk, backend=backend, dtype=dtype, device=device, fuse=fuse, threads=max(1, int(actor_cpus))
        ),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=actor_cpus,
        num_gpus=1 if torch.device(device).type == "cuda" else 0,
    )


def predict_paths_on_ray(
    paths: list[str],
    predictor: Predictor,
    output: Output,
    *,
    address: str = "local",
    batch_size: int = 32,
    concurrency: int = 1,
    actor_cpus: float = 1.0,
    progress=None,
) -> Counts:
    """The single-process job (predict.predict_files) on Ray Data: the same rows, in the same order,
    written by this process to `output`. Starts a local Ray (`address` "local") or joins the cluster
    at `address`, unless Ray is already initialised here; shuts down only what it started. The time
    counted starts once Ray is up: it includes starting the actors and fusing the model in each."""
    ray = require("ray", FEATURE)
    with connected(address):
        return _run(ray, paths, predictor, output, batch_size, concurrency, actor_cpus, progress)


@contextlib.contextmanager
def connected(address: str = "local"):
    """Ray for the block: a local Ray started (`address` "local") or the cluster at `address` joined,
    unless Ray is initialised in this process already; shuts down only what it started."""
    ray = require("ray", FEATURE)
    if ray.is_initialized():
        yield
        return
    begin = time.perf_counter()
    ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    where = "a local Ray" if address == "local" else f"the Ray cluster at {address}"
    print(f"started {where} ({ray.cluster_resources().get('CPU', 0):g} CPUs) in {time.perf_counter() - begin:.1f} s", flush=True)
    try:
        yield
    finally:
        ray.shutdown()


def _run(ray, paths, predictor, output, batch_size, concurrency, actor_cpus, progress) -> Counts:
    context = ray.data.DataContext.get_current()
    loggers = [logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")]
    saved = context.enable_progress_bars, context.execution_options.preserve_order, [logger.level for logger in loggers]
    # One progress bar (ours, so not Ray's, nor Ray's warning that its own is off), rows in the order
    # of the paths, and no log lines for each dataset.
    context.enable_progress_bars, context.execution_options.preserve_order = False, True
    for logger, level in zip(loggers, (logging.WARNING, logging.ERROR)):
        logger.setLevel(level)
    counts, start = Counts(), time.perf_counter()
    try:
        if paths:
            ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=math.ceil(len(paths) / batch_size))
            rows = predict_dataset(
                ds,
                predictor.model,
                topk=predictor.topk,
                batch_size=batch_size,
                concurrency=concurrency,
                actor_cpus=actor_cpus,
                backend=predictor.backend,
                dtype=predictor.dtype,
                device=str(predictor.device),
                fuse=predictor.fused,
            )
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                output.write(batch)
                n = counts.add(batch)
                if progress is not None:
                    progress.update(n)
    finally:
        context.enable_progress_bars, context.execution_options.preserve_order = saved[:2]
        for logger, level in zip(loggers, saved[2]):
            logger.setLevel(level)
    counts.seconds = time.perf_counter() - start
    return counts
