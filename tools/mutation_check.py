"""Mutation check: does the suite catch a planted bug in the Triton conv kernel?

Not a test (pytest does not collect it, and CI does not run it): it copies the package and the tests
to a temporary directory, plants one bug in the copy, runs the test files that exercise the Triton
backend against it, and prints how many tests failed and were skipped for each bug. A bug the suite
catches fails tests; a bug that only turns into skips or passes is a hole in the suite.

    python tools/mutation_check.py                     # every bug, this tree
    python tools/mutation_check.py --bug relu_before_residual --root /some/other/checkout
    python tools/mutation_check.py --clean             # also run the unmodified copy, for reference

It takes the Triton interpreter's time: several minutes per bug on a CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONV = "fused_resnet/backends/triton/conv.py"
RESIDUAL_THEN_RELU = """\
    if HAS_RESIDUAL:
        res_rows = res_ptr + img64 * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
        acc += tl.load(res_rows[:, None] + co64[None, :] * stride_rc, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
"""
UNSUPPORTED_HEAD = """\
def unsupported_reason(x, weight, stride, padding, dilation, groups) -> str | None:
"""


@dataclass(frozen=True)
class Bug:
    description: str
    path: str
    old: str
    new: str
    count: int  # how many times `old` occurs: a changed source must not plant a different bug silently


def _relu_first(block: str) -> str:
    residual, relu = block.split("    if RELU:\n")
    return "    if RELU:\n" + relu + residual


BUGS = {
    "relu_before_residual": Bug(
        "the conv kernel applies ReLU before adding the residual", CONV,
        RESIDUAL_THEN_RELU, _relu_first(RESIDUAL_THEN_RELU), 1,
    ),
    "width_mask_off_by_one": Bug(
        "the conv kernel's input width mask lets the column one past the edge through", CONV,
        "(iw < W)", "(iw <= W)", 2,
    ),
    "bf16_unsupported": Bug(
        "the Triton backend declares bfloat16 unsupported", CONV,
        UNSUPPORTED_HEAD, UNSUPPORTED_HEAD + '    if x.dtype == torch.bfloat16:\n        return "bfloat16 is not supported"\n', 1,
    ),
}

TEST_FILES = ["tests/test_triton_backend.py", "tests/test_properties.py", "tests/test_reliability.py"]
COPIED = ["fused_resnet", "tests", "pytest.ini"]


def plant(root: Path, bug: Bug) -> None:
    path = root / bug.path
    source = path.read_text()
    found = source.count(bug.old)
    if found != bug.count:
        sys.exit(f"{bug.path}: expected {bug.count} occurrence(s) of the text to mutate, found {found}")
    path.write_text(source.replace(bug.old, bug.new))


def counts(summary: str) -> dict[str, int]:
    """{"passed": 12, "failed": 3, ...} from pytest's last line."""
    return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", summary)}


def run(source_root: Path, bug: Bug | None, files: list[str], timeout: float) -> tuple[dict[str, int], float]:
    with tempfile.TemporaryDirectory(prefix="fused_resnet_mutant_") as tmp:
        copy = Path(tmp)
        for name in COPIED:
            src = source_root / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
            else:
                shutil.copy2(src, copy / name)
        if bug is not None:
            plant(copy, bug)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *files]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    summary = counts(lines[-1]) if lines else {}
    if not summary:
        sys.exit(f"pytest gave no summary (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return summary, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout to copy (default: the one holding this script)")
    parser.add_argument("--bug", choices=sorted(BUGS), action="append", help="plant only these (repeatable)")
    parser.add_argument("--clean", action="store_true", help="also run the unmodified copy")
    parser.add_argument("--files", nargs="+", default=TEST_FILES, help="test files to run, relative to the root")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    args = parser.parse_args()

    planted = [(name, BUGS[name]) for name in (args.bug or BUGS)]
    if args.clean:
        planted.insert(0, ("none", None))
    print(f"root {args.root}; files {' '.join(args.files)}", flush=True)
    caught_all = True
    for name, bug in planted:
        summary, seconds = run(args.root, bug, args.files, args.timeout)
        failed = summary.get("failed", 0) + summary.get("error", 0) + summary.get("errors", 0)
        skipped = summary.get("skipped", 0)
        print(f"{name:24} failed {failed:4}  skipped {skipped:4}  passed {summary.get('passed', 0):4}  "
              f"({seconds:.0f} s){'' if bug is None else '  ' + bug.description}", flush=True)
        if bug is not None and failed == 0:
            caught_all = False
    sys.exit(0 if caught_all else 1)


if __name__ == "__main__":
    main()
