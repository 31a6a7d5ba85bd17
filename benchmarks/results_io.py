"""What every benchmark run records about itself, and how its rows are written.

One run writes benchmarks/results/<name>-<UTC time>.json (every row carries the environment), a
Markdown table beside it (its summary under the table), and a PNG chart when matplotlib is there.
Then the README's results section is rewritten to show the newest GPU run of each benchmark and the
newest CPU run of the end-to-end benchmark, each labelled with its device (a CPU with its model,
instruction-set extensions and thread count).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from fused_resnet import cpu_isa

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS.parent.parent / "README.md"
BENCHMARKS = ("end_to_end", "per_layer")
CPU_BENCHMARKS = ("end_to_end",)
# The README lines between these two markers are this module's to rewrite.
SECTION_START = "<!-- newest results: written by benchmarks/results_io.py -->"
SECTION_END = "<!-- end of newest results -->"


def cpu_name() -> str:
    """The CPU's model, with the extensions that decide oneDNN's bf16 path: "AMD EPYC (AVX512-BF16, no AMX)"."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = ["AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16", "AMX" if "amx_bf16" in flags else "no AMX"]
    return f"{model} ({', '.join(features)})"


def environment(device: torch.device) -> dict:
    """GPU, driver and software versions, commit and time: stamped on every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    env = {
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        # The instruction-set level oneDNN runs at, with the ONEDNN_MAX_CPU_ISA cap that lowered it if any.
        "cpu_isa": cpu_isa.describe() if device.type == "cpu" else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "driver": None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": commit,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.split("\n")[0].strip() or None
        except OSError:
            pass
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, rows: list[dict], columns: list[str], env: dict, summary: str = "", chart=None) -> Path:
    """Writes the JSON rows, the Markdown table (with `summary` under it) and, if given, a chart.

    `chart(path)` draws the PNG; it is skipped when matplotlib is missing.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = env["time"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    base = RESULTS / f"{name}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps([{**row, **env} for row in rows], indent=1) + "\n")
    if env.get("device_type") == "cpu":
        load = "" if env.get("load_average") is None else f" (load average {env['load_average']:.2f} at the start)"
        machine = f"{env['device']}, {env['threads']} threads{load}, oneDNN at {env.get('cpu_isa')}, torch {env['torch']}"
    else:
        machine = (
            f"{env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}, cuDNN {env['cudnn']}"
        )
    header = f"# {name}\n\n{machine}, commit {env['commit']}, {env['time']}\n\n"
    base.with_suffix(".md").write_text(header + markdown_table(rows, columns) + "\n\n" + summary + "\n")
    if chart is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            chart(base.with_suffix(".png"))
        except ImportError:
            pass
    written = [base.with_suffix(suffix) for suffix in (".json", ".md", ".png")]
    print("wrote " + ", ".join(str(path) for path in written if path.exists()))
    if update_readme():
        print(f"updated the newest results in {README}")
    return base


def _ran_on_cpu(row: dict) -> bool:
    return row.get("device_type", row.get("device")) == "cpu"  # runs written before device_type: "cpu"


def newest_runs(results: Path) -> list[Path]:
    """The Markdown file of the newest GPU run of each benchmark, then of the newest CPU run of each
    benchmark in CPU_BENCHMARKS (file names sort by time)."""
    newest = []
    for on_cpu, names in ((False, BENCHMARKS), (True, CPU_BENCHMARKS)):
        for name in names:
            for path in sorted(results.glob(f"{name}-*.json"), reverse=True):
                try:
                    rows = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if rows and rows[0].get("device") is not None and _ran_on_cpu(rows[0]) == on_cpu and path.with_suffix(".md").exists():
                    newest.append(path.with_suffix(".md"))
                    break
    return newest


def results_section(runs: list[Path], relative_to: Path) -> str:
    """Per run: a link to its table (and chart), the line naming its device and versions, its summary."""
    if not runs:
        return "No run is committed yet."
    parts = []
    for md in runs:
        lines = md.read_text().splitlines()
        stamp = next((line for line in lines[1:] if line.strip()), "")
        table_end = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines))
        summary = "\n".join(lines[table_end + 1 :]).strip()
        links = f"[table]({md.relative_to(relative_to).as_posix()})"
        if md.with_suffix(".png").exists():
            links += f", [chart]({md.with_suffix('.png').relative_to(relative_to).as_posix()})"
        parts.append(f"**{md.stem.split('-')[0]}** ({links}): {stamp}\n\n{summary}")
    return "\n\n".join(parts)


def update_readme(readme: Path | None = None, results: Path | None = None) -> bool:
    """Rewrites the README's results section from the files under `results` (default: README and
    RESULTS); False if the README has no such section."""
    readme, results = readme or README, results or RESULTS
    try:
        text = readme.read_text()
    except OSError:
        return False
    if SECTION_START not in text or SECTION_END not in text:
        return False
    head, rest = text.split(SECTION_START, 1)
    _, tail = rest.split(SECTION_END, 1)
    section = results_section(newest_runs(results), readme.parent)
    readme.write_text(f"{head}{SECTION_START}\n{section}\n{SECTION_END}{tail}")
    return True
