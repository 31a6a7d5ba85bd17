"""`python -m fused_resnet predict` in one process: sources, decoding, the rows it writes in each
format against the eager model, --resume after an interruption, and its refusals.

The images are random pixels written by PIL (predict_images.py), with a truncated JPEG and a text
file named .jpg among them; the model is resnet18 with random weights at 64x64."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_resnet.__main__ as cli
from fused_resnet.predict import ImageError, Predictor, decode, image_paths, load_model, predict_files, read_image
from fused_resnet.predict_output import open_output
from fused_resnet.usage import MissingPackageError, UsageError, require

from predict_images import ARCH, BAD, CROP, GOOD, assert_rows_match_eager, eager_outputs, paths, read_csv, write_images

K = 5
# torchvision 0.29 deprecates its decoders (predict silences this, but pytest resets warning filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision are deprecated")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def logits(images):
    return eager_outputs(images)


def predict(*args) -> int:
    return cli.main(["predict", *map(str, args), "--arch", ARCH, "--crop-size", str(CROP), "--no-progress"])


# ------------------------------------------------------------------------------ sources, decoding


def test_a_folder_lists_its_images_recursively_in_order(images):
    assert image_paths([str(images)]) == paths(images)  # sorted, subfolders included, notes.txt left out


def test_globs_list_files_and_csv_files(images, tmp_path):
    assert image_paths([str(images / "*.png")]) == [str(images / "b.png"), str(images / "d.png"), str(images / "e.png")]
    assert image_paths([str(images / "**" / "*.jp*g")]) == sorted(
        str(images / n) for n in ("a.jpg", "broken.jpg", "text.jpg", "sub/f.jpg", "sub/g.jpeg")
    )
    listing = images / "sub" / "list.txt"  # relative to the list's folder; blank lines and comments skipped
    listing.write_text("f.jpg\n\n# a comment\n../a.jpg\nmissing.jpg\n")
    try:
        assert image_paths([str(listing)]) == [str(images / "sub/f.jpg"), str(images / "a.jpg"), str(images / "sub/missing.jpg")]
    finally:
        listing.unlink()
    table = tmp_path / "table.csv"
    table.write_text(f"label,path\ncat,{images / 'a.jpg'}\ndog,{images / 'b.png'}\ncat,{images / 'a.jpg'}\n")
    assert image_paths([str(table), str(images / "b.png")]) == [str(images / "a.jpg"), str(images / "b.png")]


@pytest.mark.parametrize("source, message", [("nowhere/", "is not a folder, a file or a glob"), ("nowhere/*.jpg", "matches no file")])
def test_sources_that_name_nothing_are_refused(source, message):
    with pytest.raises(UsageError, match=message):
        image_paths([source])


def test_bad_files_raise_image_errors_that_say_why(images, tmp_path):
    assert read_image(str(images / "d.png")).shape == (3, 66, 70)  # grey -> RGB
    assert read_image(str(images / "e.png")).shape == (3, 75, 66)  # RGBA -> RGB
    with pytest.raises(ImageError, match=r"^cannot decode: Image is incomplete or truncated$"):
        read_image(str(images / "broken.jpg"))
    with pytest.raises(ImageError, match="^cannot decode: Unsupported image file"):
        read_image(str(images / "text.jpg"))
    with pytest.raises(ImageError, match="^cannot read the file: No such file or directory"):
        read_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ImageError, match="^empty file$"):
        decode(b"")


# ------------------------------------------------------------------------------ the rows written


def test_fused_topk_is_eager_topk_and_bad_files_are_rows(images, logits, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert predict(images, "--out", out, "--batch", 3, "--workers", 2, "--compare-eager") == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["path", *(f"{w}_{i}" for i in range(1, K + 1) for w in ("class", "name", "prob")), "error"]
    assert_rows_match_eager(rows, images, K, logits)
    good = [row for row in rows if not row["error"]]
    from torchvision.models import ResNet18_Weights

    assert all(row["name_1"] == ResNet18_Weights.DEFAULT.meta["categories"][int(row["class_1"])] for row in good)
    stdout = capsys.readouterr().out
    assert f"compared with eager float32 on {len(GOOD)} images: top-1 agreement 100.0%, top-5 identical 100.0%" in stdout
    assert f"wrote {len(GOOD) + len(BAD)} rows to {out}" in stdout and f"{len(GOOD)} predicted, {len(BAD)} failed" in stdout


def test_the_preprocessing_is_the_weights_own(images):
    from torchvision.models import ResNet18_Weights

    model = load_model(ARCH, crop_size=CROP)
    image = read_image(str(images / "a.jpg"))
    expected = ResNet18_Weights.DEFAULT.transforms(crop_size=CROP, resize_size=round(CROP * 256 / 224))(image)
    assert torch.equal(model.preprocess(image), expected)
    default = load_model(ARCH).preprocess(image)
    assert torch.equal(default, ResNet18_Weights.DEFAULT.transforms()(image)) and default.shape == (3, 224, 224)


def test_loader_workers_do_not_change_the_rows(images, tmp_path):
    model = load_model(ARCH, crop_size=CROP)
    predictor = Predictor(model, topk=K)
    written = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.csv"
        with open_output(out, predictor.column_names()) as output:
            counts = predict_files(paths(images), predictor, output, batch_size=4, workers=workers)
        assert (counts.images, counts.failed) == (len(GOOD) + len(BAD), len(BAD))
        written.append(out.read_text())
    assert written[0] == written[1]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_hold_the_same_rows(images, logits, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (pip install \"fused_resnet[predict]\")")
    out = tmp_path / f"preds{suffix}"
    assert predict(images, "--out", out, "--topk", 3, "--workers", 0) == 0
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
        assert not (tmp_path / "preds.parquet.parts").exists()
    assert_rows_match_eager(rows, images, 3, logits)
    assert all((row["error"] is None) == (row["class_1"] is not None) for row in rows)


def test_embeddings_are_eager_pooled_features(images, tmp_path):
    features = eager_outputs(images, embeddings=True)
    out = tmp_path / "features.npy"
    assert predict(images, "--out", out, "--embeddings", "--batch", 4) == 0
    array = np.load(out)
    index = read_csv(tmp_path / "features.paths.csv")
    assert array.shape == (len(GOOD) + len(BAD), 512) and array.dtype == np.float32
    assert [row["path"] for row in index] == paths(images)
    for row, vector in zip(index, array):
        if row["error"]:
            assert np.isnan(vector).all()
        else:
            expected = features[row["path"]].numpy()
            assert np.abs(vector - expected).max() <= 1e-5 * np.abs(expected).max(), row["path"]


def test_parquet_and_jsonl_embeddings_equal_the_npy_ones(images, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (pip install \"fused_resnet[predict]\")")
    import pyarrow.parquet as pq

    for suffix in (".npy", ".parquet", ".jsonl"):
        assert predict(images, "--out", tmp_path / f"features{suffix}", "--embeddings", "--batch", 4) == 0
    array = np.load(tmp_path / "features.npy")
    for rows in (pq.read_table(tmp_path / "features.parquet").to_pylist(), _read(tmp_path / "features.jsonl")):
        assert [row["path"] for row in rows] == paths(images)
        for row, vector in zip(rows, array):
            if row["error"]:
                assert row["embedding"] is None
            else:
                assert np.array_equal(np.array(row["embedding"], dtype=np.float32), vector)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (it is in the test requirements)")
def test_a_timm_model_uses_timm_preprocessing_and_class_names(images, tmp_path):
    arch = "timm:resnet18"
    model = load_model(arch, crop_size=CROP)
    assert model.preprocess.takes_pil and "timm data config" in str(model.preprocess)
    assert model.categories[0] == "tench"
    out = tmp_path / "timm.csv"
    assert cli.main(["predict", str(images), "--arch", arch, "--crop-size", str(CROP), "--out", str(out), "--no-progress"]) == 0
    assert_rows_match_eager(read_csv(out), images, K, eager_outputs(images, arch=arch))


# ------------------------------------------------------------------------------------- --resume


def _read(out: Path) -> list[dict]:
    """The rows of an output file, whatever its format (.npy: its paths file)."""
    if out.suffix == ".csv":
        return read_csv(out)
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    return read_csv(out.with_name(out.stem + ".paths.csv"))


def _columns(predictor, images, names):
    path_list = [str(images / name) for name in names]
    errors, pixels = [], []
    for path in path_list:
        try:
            pixels.append(predictor.model.preprocess(read_image(path)))
            errors.append("")
        except ImageError as error:
            errors.append(str(error))
    return predictor.columns(path_list, errors, torch.stack(pixels) if pixels else None)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".npy"])
def test_resume_after_a_kill_writes_each_image_once(images, tmp_path, suffix):
    """A job killed after its first batch (its writer never closed, a half-written line or half a
    row of features left behind) and resumed: every image once, the first batch as it was written."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow")
    embeddings = suffix in (".npy",)
    model = load_model(ARCH, crop_size=CROP, embeddings=embeddings)
    predictor = Predictor(model, topk=K)
    out = tmp_path / f"out{suffix}"
    first = ["a.jpg", "broken.jpg"]
    killed = open_output(out, predictor.column_names(), width=model.width)
    killed.write(_columns(predictor, images, first))
    if suffix in (".csv", ".jsonl"):
        killed.file.write('"half a ro')
        killed.file.flush()
    if suffix == ".npy":
        killed.features.write(b"\0" * 100)  # features of a batch whose rows were never written
        killed.features.flush()
    with pytest.raises(UsageError, match="exists; --resume continues it, --overwrite replaces it"):
        open_output(out, predictor.column_names(), width=model.width)

    # Then the command line resumes it over the whole folder.
    args = [images, "--out", out, "--resume", "--batch", 4] + (["--embeddings"] if embeddings else [])
    assert predict(*args) == 0
    rows = _read(out)
    done = [str(images / name) for name in first]
    assert [row["path"] for row in rows] == done + [p for p in paths(images) if p not in done]
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert errors.keys() == {Path(name).name for name in BAD}
    if embeddings:
        array = np.load(out)
        assert array.shape == (len(rows), 512) and np.isnan(array[1]).all() and not np.isnan(array[0]).any()
    # Resumed once more, a finished file: nothing to add, and it stays as it was.
    assert predict(*args) == 0
    assert _read(out) == rows


def test_resume_refuses_a_file_of_other_columns(images, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert predict(images / "a.jpg", "--out", out, "--topk", 2) == 0
    before = out.read_text()
    capsys.readouterr()
    err = _misuse([images, "--arch", ARCH, "--crop-size", CROP, "--out", out, "--resume"], capsys)
    assert f"--resume: {out} has the columns path, class_1, name_1, prob_1, class_2, name_2, prob_2, error, not those of this job" in err
    assert out.read_text() == before


# ------------------------------------------------------------------------------------ refusals


def _misuse(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "", out
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "preds.txt"], "--out preds.txt: unknown format '.txt'; use .csv, .jsonl, .parquet, .npy"),
        (["--out", "preds.npy"], "--out preds.npy: .npy holds embeddings (--embeddings)"),
        (["--out", "f.csv", "--embeddings"], "--out f.csv: embeddings go to .npy, .parquet or .jsonl, not CSV"),
        (["--out", "nowhere/preds.csv"], "--out nowhere/preds.csv: nowhere is not a folder this process can write to"),
        (["--topk", "1001"], "--topk 1001: the model has 1000 classes"),
        (["--arch", "fasterrcnn_fpn_backbone"], "predict runs image classifiers; fasterrcnn_fpn_backbone is not one"),
        (["--arch", "deeplabv3_resnet50"], "predict runs image classifiers; deeplabv3_resnet50 is not one"),
        (["--weights", "missing.pt"], "weights file missing.pt does not exist"),
        (["--batch", "0"], "argument --batch: '0' is not an integer of at least 1"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ],
)
def test_misuse_is_one_line_and_exit_code_2(images, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    if "--arch" not in args:
        args = [*args, "--arch", ARCH]
    err = _misuse([images, *args, "--no-progress"], capsys)
    assert err.startswith("python -m fused_resnet predict: error: "), err
    assert message in err, err


def test_an_existing_output_is_not_overwritten_unasked(images, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("precious\n")
    err = _misuse([images, "--arch", ARCH, "--out", out], capsys)
    assert "exists; --resume continues it, --overwrite replaces it" in err
    assert out.read_text() == "precious\n"


def test_require_names_the_missing_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # how Python sees a package that is not installed
    with pytest.raises(MissingPackageError, match=r'^predict --ray needs ray, which is not installed: pip install "fused_resnet\[ray\]"$'):
        require("ray", "predict --ray")
    with pytest.raises(MissingPackageError, match=r"^a feature needs nowhere_to_be_found, which is not installed: pip install nowhere_to_be_found$"):
        require("nowhere_to_be_found.sub", "a feature")


@pytest.mark.parametrize(
    "absent, args, message",
    [
        ("tqdm", [], 'predict\'s progress bar (or --no-progress) needs tqdm, which is not installed: pip install "fused_resnet[predict]"'),
        ("ray", ["--ray", "--no-progress"], 'predict --ray needs ray, which is not installed: pip install "fused_resnet[ray]"'),
        ("pyarrow", ["--out", "p.parquet", "--no-progress"], '--out .parquet needs pyarrow, which is not installed: pip install "fused_resnet[predict]"'),
    ],
)
def test_a_missing_optional_package_is_a_one_line_refusal(images, tmp_path, monkeypatch, capsys, absent, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, absent, None)  # how Python sees a package that is not installed
    assert _misuse([images, "--arch", ARCH, *args], capsys) == f"python -m fused_resnet predict: error: {message}\n"


def test_ctrl_c_keeps_the_rows_written_and_resume_goes_on(images, logits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "preds.parquet" if importlib.util.find_spec("pyarrow") else tmp_path / "preds.jsonl"
    columns, calls = Predictor.columns, []

    def interrupted_at_the_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return columns(self, *args)

    monkeypatch.setattr(Predictor, "columns", interrupted_at_the_second_batch)
    assert predict(images, "--out", out, "--batch", 4, "--workers", 0) == 130
    assert "interrupted: " in capsys.readouterr().err
    assert [row["path"] for row in _read(out)] == paths(images)[:4]  # a finished file of the first batch
    monkeypatch.setattr(Predictor, "columns", columns)
    assert predict(images, "--out", out, "--resume", "--batch", 4) == 0
    assert_rows_match_eager(_read(out), images, K, logits)
