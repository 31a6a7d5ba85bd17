"""Where predict writes its rows, chosen by the file's suffix, and what `--resume` finds already written.

    .csv      one row per image; the columns of Predictor.column_names (top-k only)
    .jsonl    one JSON object per line, the same keys (an embedding is a list of floats)
    .parquet  the same columns (needs pyarrow)
    .npy      embeddings only: a float32 (images, features) array, and beside it <name>.paths.csv with
              the path and error of each row, in the same order

A row whose image failed keeps its path and error; its predictions are empty (CSV), null (JSONL,
Parquet) or NaN (.npy). Every writer appends as the job goes, so that an interrupted job keeps what it
wrote: CSV and JSONL append to the file itself (a half-written last line is cut off on --resume);
Parquet and .npy append to files beside it (<name>.parts/, <name>.partial) and assemble the real
file when the job ends. A finished file is taken up again by --resume, and extended.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .usage import UsageError, require

FORMATS = {".csv": "CSV", ".jsonl": "JSON lines", ".parquet": "Parquet", ".npy": "NumPy"}


def output_format(path: Path, embeddings: bool) -> str:
    """The suffix of `path` if predict can write that (top-k or embeddings) to it; else a UsageError."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out {path}: unknown format {suffix!r}; use {', '.join(FORMATS)}")
    if suffix == ".npy" and not embeddings:
        raise UsageError(f"--out {path}: .npy holds embeddings (--embeddings); write top-k to .csv, .jsonl or .parquet")
    if suffix == ".csv" and embeddings:
        raise UsageError(f"--out {path}: embeddings go to .npy, .parquet or .jsonl, not CSV")
    if suffix == ".parquet":
        require("pyarrow", "--out .parquet")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UsageError(f"--out {path}: {path.parent} is not a folder this process can write to")
    return suffix


def _value(column: str, value):
    """A column's entry as a plain Python value; None where the image failed (class -1, NaN, "")."""
    if column == "embedding":
        return None if np.isnan(value).all() else value.tolist()
    if column.startswith("class_"):
        return None if value < 0 else int(value)
    if column.startswith("prob_"):
        # The shortest decimal that reads back as the same float32.
        return None if math.isnan(value) else float(np.format_float_positional(np.float32(value), unique=True))
    return str(value) if column == "path" or value else None


def records(columns: dict[str, np.ndarray], names: list[str]):
    """The rows of a batch of columns, as dicts of plain values in the order of `names`."""
    for i in range(len(columns["path"])):
        yield {name: _value(name, columns[name][i]) for name in names}


class Output:
    """Appends batches of columns to one file; `done` is the set of paths written before (--resume)."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names, self.done = path, names, set()

    def siblings(self) -> list[Path]:
        """The files it keeps beside `path` while it writes (or always, for .npy)."""
        return []

    def resume(self) -> None:
        """Reads what a previous job wrote into `done`, checking that it has the same columns."""

    def start(self) -> None:
        """Opens the file for appending (after `resume`, or fresh)."""

    def write(self, columns: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flushes and, where the format needs it, assembles the real file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _mismatch(self, found: list[str]) -> UsageError:
        return UsageError(
            f"--resume: {self.path} has the columns {', '.join(found)}, not those of this job ({', '.join(self.names)}): "
            "the same --arch, --topk and --embeddings, or another --out"
        )


def _cut_partial_line(path: Path) -> None:
    """Cuts off a last line that an interrupted job left half written."""
    with open(path, "rb+") as file:
        data = file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            file.truncate(end)


class CSVOutput(Output):
    def resume(self):
        _cut_partial_line(self.path)
        with open(self.path, newline="") as file:
            rows = csv.reader(file)
            header = next(rows, None)
            if header is None:  # interrupted before its header: start it again
                self.path.unlink()
                return
            if header != self.names:
                raise self._mismatch(header)
            self.done = {row[0] for row in rows if row}

    def start(self):
        fresh = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self.writer.writerow(self.names)

    def write(self, columns):
        self.writer.writerows([["" if v is None else v for v in row.values()] for row in records(columns, self.names)])
        self.file.flush()

    def close(self):
        self.file.close()


class JSONLinesOutput(Output):
    def resume(self):
        _cut_partial_line(self.path)
        with open(self.path) as file:
            for line in file:
                row = json.loads(line)
                if list(row) != self.names:
                    raise self._mismatch(list(row))
                self.done.add(row["path"])

    def start(self):
        self.file = open(self.path, "a")

    def write(self, columns):
        self.file.writelines(json.dumps(row) + "\n" for row in records(columns, self.names))
        self.file.flush()

    def close(self):
        self.file.close()


class ParquetOutput(Output):
    """Each batch is a part file in <name>.parts/ (written whole, then renamed: a part is complete or
    absent); `close` writes the parts (after the rows of a finished file being resumed) as one file."""

    def __init__(self, path, names):
        super().__init__(path, names)
        self.pa, self.pq = require("pyarrow", "--out .parquet"), require("pyarrow.parquet", "--out .parquet")
        self.parts = path.with_name(path.name + ".parts")

    def siblings(self):
        return [self.parts]

    def _tables(self):
        """The finished file's table (if any), then each part's, in order."""
        files = [self.path] if self.path.exists() else []
        if self.parts.is_dir():
            files += sorted(self.parts.glob("part-*.parquet"))
        return (self.pq.read_table(file) for file in files)

    def resume(self):
        for table in self._tables():
            if table.column_names != self.names:
                raise self._mismatch(table.column_names)
            self.done.update(table.column("path").to_pylist())

    def start(self):
        self.parts.mkdir(exist_ok=True)
        self.count = len(list(self.parts.glob("part-*.parquet")))

    def _table(self, columns):
        pa, n = self.pa, len(columns["path"])
        failed = np.array([bool(e) for e in columns["error"]], dtype=bool)
        arrays = []
        for name in self.names:
            values = columns[name]
            if name == "embedding":
                flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(failed)))
            elif name in ("path", "error") or name.startswith("name_"):
                arrays.append(pa.array([_value(name, v) for v in values], type=pa.string()))
            else:
                arrays.append(pa.array(values, mask=failed) if n else pa.array(values))
        return pa.table(arrays, names=self.names)

    def write(self, columns):
        name = self.parts / f"part-{self.count:08d}.parquet"
        self.pq.write_table(self._table(columns), name.with_suffix(".tmp"))
        os.replace(name.with_suffix(".tmp"), name)
        self.count += 1

    def close(self):
        writer, temporary = None, self.path.with_name(self.path.name + ".tmp")
        for table in self._tables():  # streamed: only one part in memory at a time
            writer = writer or self.pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
            os.replace(temporary, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)


class NumpyOutput(Output):
    """Embeddings appended as raw float32 rows to <name>.partial, and each row's path and error to
    <name without .npy>.paths.csv; `close` puts the .npy header before the raw rows."""

    def __init__(self, path, names, width):
        super().__init__(path, names)
        self.width = width
        self.partial = path.with_name(path.name + ".partial")
        self.index = path.with_name(path.stem + ".paths.csv")

    def siblings(self):
        return [self.partial, self.index]

    def resume(self):
        if self.path.exists() and not self.partial.exists():  # a finished file: back to raw rows to extend it
            finished = np.load(self.path, mmap_mode="r")
            if finished.ndim != 2 or finished.shape[1] != self.width:
                raise UsageError(f"--resume: {self.path} holds arrays of shape {finished.shape}, not {self.width} features per image")
            np.ascontiguousarray(finished, dtype=np.float32).tofile(self.partial)
        if not self.index.exists():
            raise UsageError(f"--resume: {self.index} (the paths of {self.path}'s rows) is missing")
        _cut_partial_line(self.index)
        with open(self.index, newline="") as file:
            rows = list(csv.reader(file))[1:]
        row_bytes = 4 * self.width
        stored = os.path.getsize(self.partial) // row_bytes if self.partial.exists() else 0
        rows = rows[:stored]  # a row whose features were not written is done again
        with open(self.index, "w", newline="") as file:
            csv.writer(file).writerows([["path", "error"], *rows])
        with open(self.partial, "ab") as file:
            file.truncate(len(rows) * row_bytes)  # features written before their rows were: done again
        self.done = {row[0] for row in rows}

    def start(self):
        fresh = not self.index.exists()
        self.rows = open(self.index, "a", newline="")
        if fresh:
            csv.writer(self.rows).writerow(["path", "error"])
        self.features = open(self.partial, "ab")

    def write(self, columns):
        # Features first: on --resume, rows count only where their features were written.
        self.features.write(np.ascontiguousarray(columns["embedding"], dtype=np.float32).tobytes())
        self.features.flush()
        csv.writer(self.rows).writerows(zip(columns["path"], columns["error"]))
        self.rows.flush()

    def close(self):
        self.features.close()
        self.rows.close()
        rows = os.path.getsize(self.partial) // (4 * self.width)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as file, open(self.partial, "rb") as raw:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (rows, self.width)}
            np.lib.format.write_array_header_1_0(file, header)
            shutil.copyfileobj(raw, file)
        os.replace(temporary, self.path)
        self.partial.unlink()


_OUTPUTS = {".csv": CSVOutput, ".jsonl": JSONLinesOutput, ".parquet": ParquetOutput, ".npy": NumpyOutput}


def open_output(
    path: Path, names: list[str], *, width: int | None = None, resume: bool = False, overwrite: bool = False
) -> Output:
    """The writer of `path` for columns `names` (and embeddings of `width` features), ready to append;
    what it holds already is skipped with `resume`, replaced with `overwrite`, and otherwise a UsageError."""
    kind = _OUTPUTS[output_format(path, "embedding" in names)]
    output = kind(path, names, width) if kind is NumpyOutput else kind(path, names)
    existing = [p for p in [path, *output.siblings()] if p.exists()]
    if existing and overwrite:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif existing and resume:
        output.resume()
    elif existing:
        raise UsageError(f"--out {path}: {', '.join(map(str, existing))} exists; --resume continues it, --overwrite replaces it")
    output.start()
    return output
