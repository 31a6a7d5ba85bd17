"""Classify or embed image files with a fused model: `python -m fused_resnet predict`.

    python -m fused_resnet predict photos/ --arch resnet50 --weights resnet50.pt --out preds.csv

The pieces, in the order a job uses them; the Ray Data job (scale.py) and the Ray Serve deployment
(serve.py) use the same ones, so that every way of running gives the same rows:

  image_paths   folders (recursive), globs, list files (text or CSV) or image files -> a list of paths
  read_image    a file or its bytes -> 8-bit RGB (torchvision.io.decode_image), or why it cannot be
  Preprocess    the model's own preprocessing: the torchvision weights' transforms, or timm's data config
  load_model    the eager model (random or --weights), its class names and its preprocessing
  Predictor     the model fused once; a batch of pixels -> output columns (top-k or embeddings)
  ImageFiles    a Dataset of decoded, preprocessed images for a DataLoader with worker processes
  outputs       (predict_output.py) the CSV / JSONL / Parquet / .npy writers, and what --resume skips

A file that cannot be read or decoded becomes a row with its error; it never stops the job.
"""

from __future__ import annotations

import copy
import csv
import functools
import glob
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from .cli_options import load_torchvision_weights
from .convert import fuse
from .architectures import ARCHITECTURES, TIMM_PREFIX, build, check_name
from .parity import relative_error
from .predict_output import Output
from .usage import UsageError, require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# torchvision 0.29 deprecates its decoders in favour of TorchCodec and says so on every first decode
# of every process (each loader worker, each Ray actor): the decoders work, and the message is noise
# in a job's output.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")


# ---------------------------------------------------------------------------------------- sources


def _list_file_paths(path: Path) -> list[str]:
    """The paths a list file names: one per line, or a CSV's `path` column (else its first column).
    Relative paths are relative to the list file's folder, so a list kept beside its images works
    from anywhere."""
    with open(path, newline="") as file:
        if path.suffix.lower() == ".csv":
            rows = [row for row in csv.reader(file) if row]
            header = [cell.strip().lower() for cell in rows[0]] if rows else []
            column = header.index("path") if "path" in header else 0
            names = [row[column] for row in rows[1 if "path" in header else 0:] if len(row) > column]
        else:
            names = file.read().splitlines()
    names = [name.strip() for name in names]
    return [os.path.join(path.parent, name) for name in names if name and not name.startswith("#")]


def image_paths(sources: list[str]) -> list[str]:
    """The image files that `sources` name, in order, without repeats.

    A source is a folder (its JPEG / PNG / WebP files, recursively, sorted), a glob (every file it
    matches, sorted; `**` recurses), an image file, or any other file: a list of paths, one per line
    (a .csv: its `path` column, else its first). Listed files are not checked here: one that is
    missing or not an image becomes a row with its error.
    """
    paths: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = (os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
            paths += sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))
        elif glob.has_magic(source) and not path.exists():
            matches = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UsageError(f"{source!r} matches no file")
            paths += matches
        elif path.is_file():
            paths += [source] if source.lower().endswith(IMAGE_SUFFIXES) else _list_file_paths(path)
        else:
            raise UsageError(f"{source!r} is not a folder, a file or a glob that matches files")
    paths = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    if not paths:
        raise UsageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(sources)}")
    return paths


# --------------------------------------------------------------------------------------- decoding

# torchvision's decoders prefix their messages with the C++ function and source line.
_SOURCE_PREFIX = re.compile(r"^\w+, \S+:\d+, ")


class ImageError(Exception):
    """A file that is not a readable JPEG, PNG or WebP image; the message says why."""


def decode(data: bytes | bytearray | memoryview) -> Tensor:
    """The image encoded in `data` as a (3, H, W) uint8 RGB tensor (grey and RGBA images converted)."""
    if len(data) == 0:
        raise ImageError("empty file")
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = torchvision.io.decode_image(encoded, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as error:
        raise ImageError(f"cannot decode: {_SOURCE_PREFIX.sub('', str(error))}") from None
    if image.dim() == 4:  # an animated image: its first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG: the preprocessing takes 8-bit pixels
        image = torchvision.transforms.v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def read_image(path: str) -> Tensor:
    """The image in file `path` (see decode); an ImageError if it cannot be read or decoded."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ImageError(f"cannot read the file: {error.strerror or error}") from None
    return decode(data)


# ---------------------------------------------------------------------------------- preprocessing


class Preprocess:
    """The preprocessing a model was trained with: a (3, H, W) uint8 image -> a float32 input tensor.

    timm's transforms take PIL images (as timm's own loaders give them), so the decoded pixels are
    handed over as one; torchvision's take tensors. Picklable: loader workers and Ray actors get a copy.
    """

    def __init__(self, transform, takes_pil: bool, description: str):
        self.transform, self.takes_pil, self.description = transform, takes_pil, description

    def __call__(self, image: Tensor) -> Tensor:
        if self.takes_pil:
            image = torchvision.transforms.functional.to_pil_image(image)
        return self.transform(image)

    def __str__(self) -> str:
        return self.description


def torchvision_weights(arch: str):
    """The default weights enum entry of torchvision architecture `arch` (no download: its transforms
    and class names are in torchvision); None for models that are not classifiers."""
    name = ARCHITECTURES[arch][0].__name__ if arch in ARCHITECTURES else arch
    # torchvision.models itself holds the classifiers; detection, segmentation and video models live below it.
    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    return torchvision.models.get_model_weights(name).DEFAULT


def _torchvision_preprocess(weights, crop_size: int | None, resize_size: int | None) -> Preprocess:
    default = weights.transforms()
    crop = crop_size or default.crop_size[0]
    # Only a crop asked for: resize in the same proportion as the weights' own (256 for a 224 crop).
    resize = resize_size or round(crop * default.resize_size[0] / default.crop_size[0])
    transform = weights.transforms(crop_size=crop, resize_size=resize)
    text = (
        f"resize {resize} ({transform.interpolation.value}, antialiased), center crop {crop}, "
        f"mean {list(transform.mean)}, std {list(transform.std)} (torchvision {weights})"
    )
    return Preprocess(transform, False, text)


def _timm_preprocess(model: nn.Module, crop_size: int | None, resize_size: int | None) -> Preprocess:
    data = require("timm.data", "preprocessing for a timm model")
    config = data.resolve_data_config({}, model=model)
    overrides = {}
    if crop_size:
        overrides["input_size"] = (3, crop_size, crop_size)
    if resize_size:
        overrides["crop_pct"] = (crop_size or config["input_size"][-1]) / resize_size
    config = data.resolve_data_config(overrides, model=model) if overrides else config
    transform = data.create_transform(**config)
    return Preprocess(transform, True, f"timm data config {config}")


def preprocessed(read: Callable[[], Tensor], preprocess: Preprocess) -> tuple[Tensor | None, str]:
    """(pixels, "") for the image that `read` returns, or (None, why not): a bad image is a row, not an exception."""
    try:
        return preprocess(read()), ""
    except ImageError as error:
        return None, str(error)
    except Exception as error:  # a decoded image that the preprocessing refuses: still one row, with the reason
        return None, f"cannot preprocess: {type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------ model


@dataclass
class Model:
    """What a predict job runs: the eager model, in eval mode with float32 weights on the CPU."""

    arch: str
    eager: nn.Module
    preprocess: Preprocess
    categories: list[str] | None  # class names, where the weights' classes are known
    width: int | None  # with the classifier removed (embeddings), the number of pooled features; else None
    source: str  # where the weights came from, for the report

    @property
    def embeddings(self) -> bool:
        return self.width is not None


def _timm_categories(model: nn.Module) -> list[str] | None:
    data = require("timm.data", "class names for a timm model")
    subset = data.infer_imagenet_subset(model)
    if subset is None:
        return None
    # ImageNet descriptions list synonyms ("tench, Tinca tinca"): the first is the name torchvision uses.
    return [text.split(",")[0] for text in data.ImageNetInfo(subset).label_descriptions()]


def _remove_classifier(model: nn.Module, arch: str) -> int:
    """Makes `model` return its pooled features, and says how many: timm's own reset_classifier(0), or
    the last Linear layer (a ResNet's fc, the end of a torchvision classifier head) made the identity."""
    if arch.startswith(TIMM_PREFIX):
        model.reset_classifier(0)
        return model.num_features
    name, linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    return linear.in_features


def load_model(
    arch: str,
    weights: str | None = None,
    *,
    embeddings: bool = False,
    crop_size: int | None = None,
    resize_size: int | None = None,
    seed: int = 0,
) -> Model:
    """The model `arch` with the state_dict in `weights` (else random weights, BatchNorm statistics
    randomised), its preprocessing (overridable with crop_size / resize_size) and its class names."""

    check_name(arch)
    tv_weights = None if arch.startswith(TIMM_PREFIX) else torchvision_weights(arch)
    if not arch.startswith(TIMM_PREFIX) and tv_weights is None:
        raise UsageError(f"predict runs image classifiers; {arch} is not one (a backbone or a segmentation model)")
    if weights is None:
        model, source = build(arch, torch.Generator().manual_seed(seed)), f"random weights (seed {seed}, no --weights): the classes mean nothing"
    else:
        model, source = load_torchvision_weights(arch, Path(weights)), f"weights from {weights}"
    model = model.float().eval()
    if arch.startswith(TIMM_PREFIX):
        preprocess, categories = _timm_preprocess(model, crop_size, resize_size), _timm_categories(model)
    else:
        preprocess, categories = _torchvision_preprocess(tv_weights, crop_size, resize_size), tv_weights.meta["categories"]
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    if categories is not None and len(categories) != classes:
        categories = None  # a head fine-tuned to other classes: their names are not in the weights
    width = _remove_classifier(model, arch) if embeddings else None
    return Model(arch, model, preprocess, None if embeddings else categories, width, source)


class Predictor:
    """The model fused once (or left eager, to compare), turning batches of pixels into output columns.

    Columns (numpy arrays, one entry per image): `path`; `class_i`, `prob_i`, and `name_i` where the
    weights carry class names, for i = 1..topk (-1, NaN and "" for an image that failed); or
    `embedding` (float32, NaN for an image that failed); `error` ("" for an image that worked).
    """

    def __init__(
        self,
        model: Model,
        *,
        topk: int = 5,
        fuse: bool = True,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.model, self.topk, self.fused, self.backend = model, topk, fuse, backend
        self.dtype, self.device = dtype, torch.device(device)
        if not model.embeddings:
            classes = [m for m in model.eager.modules() if isinstance(m, nn.Linear)][-1].out_features
            if not 1 <= topk <= classes:
                raise UsageError(f"--topk {topk}: the model has {classes} classes")

    @functools.cached_property
    def module(self) -> nn.Module:
        """The model that runs: fused on first use (a job on Ray fuses in its actors, not here)."""
        eager = self.model.eager.to(self.device)
        return fuse(eager, backend=self.backend, dtype=self.dtype) if self.fused else copy.deepcopy(eager).to(self.dtype)

    def column_names(self) -> list[str]:
        if self.model.embeddings:
            return ["path", "embedding", "error"]
        per_class = ("class", "name", "prob") if self.model.categories is not None else ("class", "prob")
        return ["path", *(f"{what}_{i}" for i in range(1, self.topk + 1) for what in per_class), "error"]

    @torch.no_grad()
    def outputs(self, pixels: Tensor) -> Tensor:
        """The model's logits (or features) for a batch of preprocessed images, float32 on the CPU."""
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        return self.module(x).float().cpu()

    def columns(self, paths: list[str], errors: list[str], pixels: Tensor | None) -> dict[str, np.ndarray]:
        """The output columns for images `paths`, where `pixels` holds (in order) those whose error is ""."""
        ok = np.array([not error for error in errors], dtype=bool)
        outputs = self.outputs(pixels) if ok.any() else None
        columns = {"path": np.array(paths, dtype=object)}
        if self.model.embeddings:
            embedding = np.full((len(paths), self.model.width), np.nan, dtype=np.float32)
            if outputs is not None:
                embedding[ok] = outputs.numpy()
            columns["embedding"] = embedding
        else:
            classes = np.full((len(paths), self.topk), -1, dtype=np.int64)
            probs = np.full((len(paths), self.topk), np.nan, dtype=np.float32)
            if outputs is not None:
                # Ranked by logit, not probability: probabilities saturate to equal 0s and 1s.
                top = outputs.topk(self.topk, dim=1)
                classes[ok] = top.indices.numpy()
                probs[ok] = outputs.softmax(dim=1).gather(1, top.indices).numpy()
            for i in range(self.topk):
                columns[f"class_{i + 1}"] = classes[:, i]
                if self.model.categories is not None:
                    names = self.model.categories
                    columns[f"name_{i + 1}"] = np.array([names[c] if c >= 0 else "" for c in classes[:, i]], dtype=object)
                columns[f"prob_{i + 1}"] = probs[:, i]
        columns["error"] = np.array(errors, dtype=object)
        return columns


# ------------------------------------------------------------------------------- single process


class ImageFiles(torch.utils.data.Dataset):
    """(path, preprocessed pixels or None, error or "") for each path: loader workers decode."""

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        return path, *preprocessed(lambda: read_image(path), self.preprocess)


def collate(items) -> tuple[list[str], list[str], Tensor | None]:
    """(paths, errors, the pixels of the images without error, stacked)."""
    paths, pixels, errors = zip(*items)
    good = [p for p in pixels if p is not None]
    return list(paths), list(errors), torch.stack(good) if good else None


@dataclass
class Counts:
    images: int = 0
    failed: int = 0
    seconds: float = 0.0

    def add(self, columns: dict[str, np.ndarray]) -> int:
        n = len(columns["path"])
        self.images += n
        self.failed += int(sum(bool(e) for e in columns["error"]))
        return n


def predict_files(
    paths: list[str], predictor: Predictor, output: Output, *, batch_size: int = 32, workers: int = 1, progress=None
) -> Counts:
    """Runs `predictor` over `paths` with a DataLoader of `workers` processes (0: decode in this one)
    and writes one row per path to `output`, in order; `progress` (a tqdm bar) is told of each batch."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, predictor.model.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=predictor.device.type == "cuda",
    )
    counts, start = Counts(), time.perf_counter()
    for batch_paths, errors, pixels in loader:
        columns = predictor.columns(batch_paths, errors, pixels)
        output.write(columns)
        n = counts.add(columns)
        if progress is not None:
            progress.update(n)
    counts.seconds = time.perf_counter() - start
    return counts


def compare_with_eager(predictor: Predictor, paths: list[str], sample: int) -> str:
    """The fused model against the eager float32 model on the same preprocessed batch of (up to)
    `sample` images of `paths`: top-1 agreement and identical top-k, or the features' difference."""
    items = [ImageFiles(paths, predictor.model.preprocess)[i] for i in range(min(sample, len(paths)))]
    pixels = [p for _, p, _ in items if p is not None]
    if not pixels:
        return "compare with eager: none of the sampled images could be read"
    x = torch.stack(pixels)
    ours = predictor.outputs(x)
    with torch.no_grad():
        eager = predictor.model.eager.to(predictor.device)(x.to(predictor.device)).float().cpu()
    what = "fused" if predictor.fused else "eager"
    if predictor.model.embeddings:
        return f"compared with eager float32 on {len(x)} images: {what} features differ by {relative_error(ours, eager):.1e} (max relative)"
    k = predictor.topk
    top1 = (ours.argmax(1) == eager.argmax(1)).double().mean().item()
    topk = (ours.topk(k, dim=1).indices == eager.topk(k, dim=1).indices).all(1).double().mean().item()
    difference = (ours.softmax(1) - eager.softmax(1)).abs().max().item()
    return (
        f"compared with eager float32 on {len(x)} images: top-1 agreement {top1:.1%}, top-{k} identical {topk:.1%}, "
        f"max probability difference {difference:.1e}"
    )
