"""What the subcommands of the command line share: option types, devices, dtypes, backends and weights
files, each checked before anything is computed and refused with a UsageError (one line, exit code 2)."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import nn

from . import backends
from .architectures import ARCHITECTURES, check_name, classifier_weight_key, create
from .call import ConvCall
from .usage import UsageError

ARCH_HELP = f"{', '.join(ARCHITECTURES)}, or timm:<name> (any timm model, e.g. timm:resnet50d)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
def _device(name: str) -> torch.device:
    """The device called `name`, checked to be there ("auto": a GPU if there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: fused_resnet runs on cpu and cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available (torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


# The layer asked of a backend to learn whether it computes a dtype: a plain 3x3 conv of 64 channels,
# which every ResNet is mostly made of.
_PROBE_CHANNELS, _PROBE_SIZE = 64, 8


def _check_backend(name: str, device: torch.device, dtype_name: str) -> None:
    """A usage error if backend `name` cannot run on `device`, or would leave its layers in
    `dtype_name` to the reference backend."""
    if name == "auto":
        return
    backend = backends.get(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise UsageError(f"--backend {name} cannot run on {device.type}: {reason}")
    dtype = DTYPES[dtype_name]
    x = torch.empty(1, _PROBE_CHANNELS, _PROBE_SIZE, _PROBE_SIZE, dtype=dtype, device=device)
    weight = torch.empty(_PROBE_CHANNELS, _PROBE_CHANNELS, 3, 3, dtype=dtype, device=device)
    reason = backend.conv_unsupported_reason(ConvCall.of(x, weight, padding=1))
    if reason is not None:
        raise UsageError(f"--backend {name} does not compute {dtype_name} convolutions: {reason}")


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_torchvision_weights(arch: str, path: Path) -> nn.Module:
    """The torchvision model `arch` in eval mode with the state_dict saved in `path`.

    Its number of classes is that of the file's fc.weight, so a fine-tuned head loads as well.
    """
    wanted = "a state_dict, as written by torch.save(model.state_dict(), path)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"weights file {path} does not exist") from None
    except pickle.UnpicklingError:
        raise UsageError(
            f"cannot read {path} as {wanted}: it is not a torch.save file, or it holds Python objects other than "
            "tensors (a whole model saved with torch.save(model)?)"
        ) from None
    except Exception as error:  # the file is the user's: whatever it holds, say why it cannot be read
        reason = f"{type(error).__name__}: {error}"
        raise UsageError(f"cannot read {path} as {wanted}: not a torch.save file ({reason})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not {wanted}")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(f"{path} holds a dict whose entries {_listed(not_tensors)} are not tensors, not {wanted}")
    classifier = state.get(classifier_weight_key(arch))
    num_classes = classifier.shape[0] if classifier is not None and classifier.dim() >= 2 else 1000
    model = create(arch, num_classes)
    expected = model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    # load_state_dict, not a comparison of keys, decides what is missing: some modules (FrozenBatchNorm2d)
    # drop keys of the file on purpose.
    result = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    problems = []
    missing = [k for k in result.missing_keys if k not in mismatched]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys ({len(result.unexpected_keys)}): {_listed(result.unexpected_keys)}")
    if mismatched:
        shapes = [f"{k} is {tuple(state[k].shape)} here, {tuple(expected[k].shape)} in {arch}" for k in mismatched]
        problems.append(f"shapes that differ ({len(mismatched)}): {_listed(shapes)}")
    if problems:
        raise UsageError(f"{path} does not hold {arch} weights: " + "; ".join(problems))
    return model


def _at_least(least: int):
    """An argparse type: an int of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer of at least {least}")
        return value

    return parse


def _arch(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


