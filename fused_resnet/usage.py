"""The command line's one kind of refusal, and the optional packages its subcommands import lazily.

Every subcommand reports what it cannot do as one line on stderr with exit code 2 (UsageError). Some
need packages that fused_resnet does not install by default (tqdm, pyarrow, ray): `require` imports
one when it is first needed, or refuses in one line that names the package and how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The pip extra that brings each optional package (setup.py's extras_require).
EXTRAS = {"tqdm": "predict", "pyarrow": "predict", "ray": "ray"}


class UsageError(Exception):
    """Something the user asked for that cannot be done: one line on stderr, exit code 2."""


class MissingPackageError(UsageError, ImportError):
    """An optional package that a feature needs is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """`module` imported, or a MissingPackageError saying that `feature` needs it and how to get it."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is None or error.name.split(".")[0] != package:
            raise  # the package is there but something it imports is broken: show the real error
        extra = EXTRAS.get(package)
        hint = f'pip install "fused_resnet[{extra}]"' if extra else f"pip install {package}"
        raise MissingPackageError(f"{feature} needs {package}, which is not installed: {hint}") from None
