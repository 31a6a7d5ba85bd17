"""Exits 1, naming them, if some of the requirements given (`name` or `name==version`) are not
installed in this Python; 0 otherwise. `make` asks this first and runs pip only when needed: pip
takes seconds to start even when everything is installed.

    python fused_resnet/_build/missing_requirements.py ninja nvidia-cutlass==4.2.0.0 || pip install ...
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable


def missing(requirements: Iterable[str]) -> list[str]:
    """The requirements not installed, or installed in another version than the one pinned."""
    result = []
    for requirement in requirements:
        name, _, pinned = requirement.partition("==")
        name = name.partition("[")[0]  # "ray[data,serve]" is checked as ray; the extras' own packages are not looked at
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or (pinned and installed != pinned):
            result.append(requirement)
    return result


if __name__ == "__main__":
    absent = missing(sys.argv[1:])
    if absent:
        print(f"installing {' '.join(absent)}", flush=True)
    sys.exit(1 if absent else 0)
