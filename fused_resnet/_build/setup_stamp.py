"""Set-up without needless rebuilds: `make setup` runs this instead of `pip install -e .` directly.

    python fused_resnet/_build/setup_stamp.py

Installing fused_resnet compiles its CPU extension (seconds) and its CUDA extension (minutes). After each
successful install,
build/setup-stamp.json records what the build depended on: the files under csrc/, setup.py and
pyproject.toml, the torch and CUTLASS versions, TORCH_CUDA_ARCH_LIST, FUSED_RESNET_BUILD_CUDA, the
nvcc found, whether torch sees a GPU (without one the extension is skipped), and this Python.
When none of that has changed, the package is installed from this tree in this Python environment
and the compiled extensions are still there, nothing is done; otherwise pip installs
quietly (its output goes to build/setup.log), and ninja recompiles only the sources whose
objects are out of date (setup.py keeps them in build/ext). Either way one line says what each
extension was built for, or why it was not.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source tree: fused_resnet/_build/ is two levels down
STAMP = Path("build", "setup-stamp.json")
LOG = Path("build", "setup.log")
# setup.py prints one line starting with each of these, saying what it builds (or why it builds nothing).
SUMMARY_PREFIXES = ("CUDA extension: ", "CPU extension: ")
_BUILD_FILES = ("setup.py", "pyproject.toml")
_ENVIRONMENT_VARIABLES = (
    "TORCH_CUDA_ARCH_LIST", "FUSED_RESNET_SKIP_CUDA_BUILD", "FUSED_RESNET_BUILD_CUDA", "FUSED_RESNET_SKIP_CPU_BUILD", "CUDA_HOME",
    "CUDA_PATH",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc(environ: Mapping[str, str]) -> str:
    """The nvcc the build would use: torch looks on the PATH, then in /usr/local/cuda."""
    found = shutil.which("nvcc", path=environ.get("PATH"))
    if found is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found or "(none)"


def gpu_present() -> str:
    """Whether torch sees a CUDA GPU, which decides whether setup.py builds the extension: "yes", "no",
    or "unknown" without torch. Asked in a child process, so that this one stays free of CUDA."""
    code = "import torch; print('yes' if torch.cuda.is_available() else 'no')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def build_inputs(root: Path, environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, str]]:
    """What the build depends on: source files by content, and the tools and settings it uses."""
    files = [p for p in sorted((root / "csrc").rglob("*")) if p.is_file()] + [root / name for name in _BUILD_FILES]
    sources = {p.relative_to(root).as_posix(): _sha256(p) for p in files if p.exists()}
    environment = {name: environ.get(name, "(unset)") for name in _ENVIRONMENT_VARIABLES}
    environment.update(
        torch=_version("torch"),
        cutlass=_version("nvidia-cutlass"),
        nvcc=_nvcc(environ),
        # A GPU decides the build only where there is an nvcc and FUSED_RESNET_BUILD_CUDA is not 1; only
        # then is torch asked (it takes a second or two to import).
        gpu=gpu_present() if _nvcc(environ) != "(none)" and environ.get("FUSED_RESNET_BUILD_CUDA") != "1" else "not asked",
        python=f"{sys.version.split()[0]} at {sys.prefix}",
    )
    return {"sources": sources, "environment": environment}


def _changes(old: Mapping[str, str], new: Mapping[str, str], describe: Callable[[str, str | None, str | None], str]) -> list[str]:
    return [describe(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _source_change(name: str, old: str | None, new: str | None) -> str:
    return f"{name} {'added' if old is None else 'removed' if new is None else 'changed'}"


def _setting_change(name: str, old: str | None, new: str | None) -> str:
    return f"{name} {old} -> {new}"


def reason_to_rebuild(stamp: dict | None, inputs: dict, present: Collection[str], installed_here: bool) -> str | None:
    """Why the package must be installed (and its extensions built) again, or None when it need not be.

    `stamp` is what the last successful install recorded (None if there was none); `inputs` what the
    build depends on now (build_inputs); `present` the compiled extensions in the tree now.
    """
    if stamp is None:
        return "no earlier build in this tree"
    changes = _changes(stamp["inputs"]["sources"], inputs["sources"], _source_change)
    changes += _changes(stamp["inputs"]["environment"], inputs["environment"], _setting_change)
    if changes:
        return "; ".join(changes)
    if "extensions" not in stamp:
        return "the stamp does not list the extensions built"
    missing = [name for name in stamp["extensions"] if name not in present]
    if missing:
        return f"{missing[0]} is missing"
    if not installed_here:
        return "fused_resnet is not installed from this tree in this Python environment"
    return None


def _installed_from(root: Path) -> bool:
    try:
        distribution = importlib.metadata.distribution("fused_resnet")
    except importlib.metadata.PackageNotFoundError:
        return False
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    return direct_url.get("url") == root.as_uri()


def _extensions(root: Path) -> list[Path]:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return sorted(p for name in ("_C", "_cpu") for p in (root / "fused_resnet").glob(name + suffix))


def pip_install(root: Path, log: Path) -> int:
    """pip install -e of the tree, its whole output (verbose, so that setup.py's lines show) in `log`."""
    command = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--disable-pip-version-check"]
    command += ["--root-user-action=ignore", "-e", str(root)]
    with log.open("w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=root).returncode


def _relative(root: Path, paths: list[Path]) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def _summary(log: Path) -> str:
    """setup.py's last line about each extension, one after the other."""
    text, said = log.read_text().splitlines(), []
    for prefix in SUMMARY_PREFIXES:
        lines = [line[line.index(prefix) :].strip() for line in text if prefix in line]
        said.append(lines[-1] if lines else f"{prefix}setup.py did not say (see {log})")
    return "; ".join(said)


def ensure_installed(root: Path = ROOT, install: Callable[[Path, Path], int] = pip_install) -> int:
    """Installs the tree unless the stamp shows nothing changed; prints one line either way. The exit code."""
    stamp_path, log = root / STAMP, root / LOG
    inputs = build_inputs(root)
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
    extensions = _extensions(root)
    reason = reason_to_rebuild(stamp, inputs, _relative(root, extensions), _installed_from(root))
    if reason is None:
        print(f"{stamp['summary']} (reused: nothing it is built from changed)")
        return 0
    print(f"fused_resnet: installing and building ({reason}); the full output goes to {LOG}", flush=True)
    # An extension left from an earlier build would survive a failed one, and setuptools skips the
    # build when the .so is newer than the .cu files (it does not see headers); ninja keeps the objects.
    for extension in extensions:
        extension.unlink()
    log.parent.mkdir(exist_ok=True)
    start = time.monotonic()
    status = install(root, log)
    if status != 0:
        sys.stderr.writelines(line + "\n" for line in log.read_text().splitlines()[-25:])
        print(f"fused_resnet: pip install failed (exit code {status}); the full output is in {LOG}", file=sys.stderr)
        return status
    extensions = _extensions(root)
    stamp = {
        "inputs": inputs,
        "summary": _summary(log),
        "extensions": _relative(root, extensions),
    }
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"{stamp['summary']} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(ensure_installed())
