"""Image files for the predict tests, and the eager reference they are checked against."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fused_resnet.predict import load_model, read_image

ARCH, CROP, SEED = "resnet18", 64, 0
# (name, size (width, height), PIL mode): JPEG, PNG and WebP; grey, RGBA and odd sizes; one in a subfolder.
GOOD = [
    ("a.jpg", (72, 60), "RGB"),
    ("b.png", (64, 90), "RGB"),
    ("c.webp", (80, 80), "RGB"),
    ("d.png", (70, 66), "L"),
    ("e.png", (66, 75), "RGBA"),
    ("sub/f.jpg", (100, 67), "RGB"),
    ("sub/g.jpeg", (65, 64), "RGB"),
]
BAD = {"broken.jpg": "truncated", "text.jpg": "Unsupported image file"}


def write_images(folder: Path, seed: int = 0) -> Path:
    """Random-content images (GOOD), a truncated JPEG and a text file named .jpg (BAD), and a .txt
    that a folder listing leaves out."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for name, (width, height), mode in GOOD:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / name)
    whole = (folder / "a.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("not listed: not an image suffix\n")
    return folder


def paths(folder: Path) -> list[str]:
    """The image files of `folder` in the order a folder listing gives them (sorted, recursive)."""
    names = sorted([name for name, _, _ in GOOD] + list(BAD))
    return [str(folder / name) for name in names]


@torch.no_grad()
def eager_outputs(folder: Path, embeddings: bool = False, arch: str = ARCH) -> dict[str, torch.Tensor]:
    """The eager float32 model's logits (or pooled features) for each good image, preprocessed as predict does."""
    model = load_model(arch, embeddings=embeddings, crop_size=CROP, seed=SEED)
    good = [str(folder / name) for name, _, _ in GOOD]
    x = torch.stack([model.preprocess(read_image(path)) for path in good])
    return dict(zip(good, model.eager(x)))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def topk(row: dict, k: int) -> tuple[list[int], list[float]]:
    """A written row's classes and probabilities (from CSV strings, JSON or Parquet values)."""
    return [int(row[f"class_{i}"]) for i in range(1, k + 1)], [float(row[f"prob_{i}"]) for i in range(1, k + 1)]


def assert_rows_match_eager(rows: list[dict], folder: Path, k: int, logits: dict[str, torch.Tensor] | None = None) -> None:
    """Each row of a good image has eager's top-k classes, in order, and its probabilities (float32
    rounding apart); each bad file has a row with its error and no prediction."""
    logits = logits or eager_outputs(folder)
    assert [row["path"] for row in rows] == paths(folder)
    for row in rows:
        name = Path(row["path"]).relative_to(folder).as_posix()
        if name in BAD:
            assert BAD[name] in row["error"], row
            assert row["class_1"] in ("", None) and row["prob_1"] in ("", None), row
            continue
        assert not row["error"], row
        expected = logits[row["path"]]
        top = expected.topk(k)
        classes, probs = topk(row, k)
        assert classes == top.indices.tolist(), (row["path"], classes, top.indices.tolist())
        probabilities = expected.softmax(0)[top.indices]
        assert np.allclose(probs, probabilities.numpy(), rtol=1e-5, atol=1e-7), (probs, probabilities)
        assert not any(math.isnan(p) for p in probs)
