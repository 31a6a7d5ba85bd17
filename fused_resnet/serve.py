"""Online serving with Ray Serve: `python -m fused_resnet serve --arch resnet50 [--weights FILE] [--replicas N]`.

    curl --data-binary @cat.jpg http://127.0.0.1:8000/
    {"topk": [{"class": 281, "name": "tabby", "prob": 0.4134}, ...]}

A POST body is the image file's bytes, or JSON {"image": "<base64 of the file>"}; one that is not
a JPEG, PNG or WebP image gets status 400 and {"error": "..."}. Each replica fuses the model once,
when it starts. A request is decoded and preprocessed when it arrives (in a thread, beside the
inference of earlier ones); Ray Serve's dynamic batching (`serve.batch`) then gathers up to
`max_batch_size` images, waiting at most `batch_wait_ms` for a batch to fill, and runs them as one batch.

    from fused_resnet.predict import load_model
    from fused_resnet.serve import application
    ray.serve.run(application(load_model("resnet50", "resnet50.pt"), replicas=2))

The command line binds 127.0.0.1 only; put a proxy of your own in front to serve beyond this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import signal
import sys
import threading
import time

import torch

from .version import __version__

from .predict import ImageError, Model, Predictor, decode, load_model, preprocessed
from .predict_cli import add_model_arguments, device_and_dtype, positive_int
from .predict_output import records
from .usage import UsageError, require

FEATURE = "serve"


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image file in a request body: the body itself, or the base64 `image` of a JSON body."""
    if not content_type.split(";")[0].strip().lower() == "application/json":
        return body
    try:
        return base64.b64decode(json.loads(body)["image"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise ImageError(f'a JSON body must be {{"image": "<base64 of an image file>"}} ({type(error).__name__}: {error})') from None


class Classifier:
    """A Ray Serve deployment's class: the model fused once per replica, dynamic batching, HTTP in and out."""

    def __init__(self, model: Model, *, topk: int, backend: str, dtype: torch.dtype, device: str, max_batch_size: int,
                 batch_wait_s: float, threads: int):
        serve = require("ray.serve", FEATURE)
        torch.set_num_threads(threads)  # the replica's CPUs, not the whole machine's
        self.predictor = Predictor(model, topk=topk, backend=backend, dtype=dtype, device=device)
        self.predictor.module  # fuse now: the first request should not pay for it
        self.names = self.predictor.column_names()
        # serve.batch applied here rather than as a decorator, so that its sizes are options of the deployment.
        self.classify = serve.batch(self._classify_batch, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        self.batch_sizes: list[int] = []  # what dynamic batching gathered, for tests and tuning

    def _topk(self, pixels: list[torch.Tensor]) -> list[dict]:
        n = len(pixels)
        columns = self.predictor.columns([""] * n, [""] * n, torch.stack(pixels))
        self.batch_sizes.append(n)
        k = self.predictor.topk
        has_names = self.predictor.model.categories is not None
        return [
            {"topk": [{"class": row[f"class_{i}"], **({"name": row[f"name_{i}"]} if has_names else {}), "prob": row[f"prob_{i}"]} for i in range(1, k + 1)]}
            for row in records(columns, self.names)
        ]

    async def _classify_batch(self, pixels: list[torch.Tensor]) -> list[dict]:
        # In a thread: the event loop keeps accepting and decoding requests while the model runs.
        return await asyncio.to_thread(self._topk, pixels)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method != "POST":
            return JSONResponse({"error": "POST an image: its bytes, or JSON {\"image\": \"<base64>\"}"}, status_code=405)
        body = await request.body()
        try:
            data = image_bytes(body, request.headers.get("content-type", ""))
        except ImageError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        pixels, error = await asyncio.to_thread(preprocessed, lambda: decode(data), self.predictor.model.preprocess)
        if error:
            return JSONResponse({"error": error}, status_code=400)
        return await self.classify(pixels)

    def stats(self) -> dict:
        """The batch sizes run so far (through a deployment handle)."""
        return {"batch_sizes": list(self.batch_sizes)}


def application(
    model: Model,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    topk: int = 5,
    max_batch_size: int = 16,
    batch_wait_ms: float = 10.0,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """The Ray Serve application serving `model` (a predict.Model) with `replicas` replicas of
    `replica_cpus` CPUs (and torch threads) each: pass it to `ray.serve.run`."""
    serve = require("ray.serve", FEATURE)
    Predictor(model, topk=topk)  # refuses a bad topk here, not in every replica
    deployment = serve.deployment(
        Classifier,
        name="fused_resnet",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": 1 if torch.device(device).type == "cuda" else 0},
        # Room for a full batch to gather while the one before runs.
        max_ongoing_requests=2 * max_batch_size,
    )
    return deployment.bind(
        model, topk=topk, backend=backend, dtype=dtype, device=device, max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_ms / 1000, threads=max(1, int(replica_cpus)),
    )


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="replicas of the model (default 1)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica (default 1)")
    parser.add_argument("--max-batch-size", type=positive_int, default=16, help="images per batch at most (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch may wait to fill (default 10 ms)")


def run(args) -> int:
    ray = require("ray", FEATURE)
    serve = require("ray.serve", FEATURE)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port number")
    device, dtype = device_and_dtype(args)
    model = load_model(args.arch, args.weights, crop_size=args.crop_size, resize_size=args.resize_size, seed=args.seed)
    app = application(
        model, replicas=args.replicas, replica_cpus=args.replica_cpus, topk=args.topk, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, backend=args.backend, dtype=dtype, device=str(device),
    )
    print(f"fused_resnet {__version__} | torch {torch.__version__} | {args.arch}, {args.dtype}, device {device}, backend {args.backend!r}")
    print(f"model: {model.source}")
    print(f"preprocessing: {model.preprocess}", flush=True)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not its INFO lines about starting up
    begin = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    # SIGTERM ends the process as Ctrl-C does: through the `finally` that stops Serve and Ray.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
        serve.run(app, name="fused_resnet", route_prefix="/")
        print(
            f"serving on http://127.0.0.1:{args.port}/ ({args.replicas} replica{'s' * (args.replicas > 1)}, batches of up to "
            f"{args.max_batch_size}, {args.batch_wait_ms:g} ms wait), ready in {time.perf_counter() - begin:.1f} s. Ctrl-C stops it.",
            flush=True,
        )
        print(f"  curl --data-binary @image.jpg http://127.0.0.1:{args.port}/", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
