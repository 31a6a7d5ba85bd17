"""The ways of running a ResNet that fused_resnet is measured against, and its own ways, by name.

Each peer is built from one eval-mode model and returns a callable taking the NCHW input batch;
every peer converts layout inside its call when it needs to, as a user would have to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from . import backends, inference_engines
from .convert import fuse
from .cuda_graph import CUDAGraphModule

EAGER = ("eager NCHW", "eager channels_last", "torch.fx fold")
COMPILED = ("compile default", "compile freezing", "compile max-autotune+freezing", "compile reduce-overhead")
# One peer per backend (fr.fuse with that backend), named by the backends' own list, then "auto".
_BACKEND_OF = {**{b.peer_name: b.name for b in backends.BACKENDS}, "ours auto": "auto"}
OURS = (*(name for name in _BACKEND_OF if name.startswith("ours")), "ours auto + CUDA graph")
LIBRARY = tuple(name for name in _BACKEND_OF if not name.startswith("ours"))  # "cudnn fused"
# The CPU inference engines (optional packages; see inference_engines.py).
ENGINES = {"ONNX Runtime": "onnxruntime", "OpenVINO": "openvino"}
ALL = (*EAGER, *COMPILED, *LIBRARY, *ENGINES, *OURS)
# The CPU comparison: eager, BN folded by torch.fx, ours, Inductor with freezing (which runs the same
# oneDNN primitives as our CPU backend, after a compile step) and without, ONNX Runtime and OpenVINO.
# Each is set up (built, then called once) in this order in one process. Ours and Inductor's first
# compile follow only the eager peers, as in a process of a user's: set up after Inductor's compiles and
# both engines' sessions, fr.fuse of a ResNet-50 took 2-4x as long (its copies of the weights ran at a
# fraction of the memory bandwidth), which no user who fuses a model meets.
CPU = ("eager NCHW", "eager channels_last", "torch.fx fold", "ours auto", "compile freezing", "compile default", *ENGINES)


def _compiled(model: nn.Module, mode: str, freezing: bool = False) -> Callable:
    compiled = torch.compile(model, mode=mode, dynamic=False)  # one specialised graph per batch size
    first = [True]

    def run(x):
        x = x.contiguous(memory_format=torch.channels_last)
        if first[0]:  # compilation happens on the first call: that is when freezing must be on
            first[0] = False
            # On empty caches, in memory and on disk, as a user's first compile of this model and input
            # size: kernels an earlier compile in this process left would make it a cache hit.
            from torch._inductor.utils import fresh_cache

            with torch._inductor.config.patch(freezing=freezing), fresh_cache():
                return compiled(x)
        return compiled(x)

    return run


def _with_cudnn_autotuner(run: Callable) -> Callable:
    """`run` with cuDNN's autotuner on (torch.backends.cudnn.benchmark), as cuDNN is run by anyone
    timing it: without it, cuDNN takes its heuristic's first algorithm. The flag is restored after
    each call, so that the peers around this one run with the caller's setting."""

    def call(x):
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return run(x)
        finally:
            torch.backends.cudnn.benchmark = previous

    return call


def _channels_last_input(model: nn.Module) -> Callable:
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def of_backend(backend: str) -> str:
    """The peer that runs fr.fuse(model, backend=backend)."""
    return next(name for name, b in _BACKEND_OF.items() if b == backend)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why a peer cannot run on `device` (in `dtype`, when given), or None."""
    if name in ENGINES:
        return inference_engines.unavailable_reason(ENGINES[name], device, dtype)
    backend = _BACKEND_OF.get(name)
    if backend not in (None, "auto"):
        return backends.get(backend).unavailable_reason(device)
    if name in ("ours auto + CUDA graph", "compile reduce-overhead") and device.type != "cuda":
        return "needs CUDA graphs"
    return None


def build(name: str, model: nn.Module, dtype: torch.dtype) -> Callable:
    """Peer `name` for `model` (on its device, eval mode), computing in `dtype`."""
    if name in ENGINES:
        return inference_engines.build(ENGINES[name], model, dtype)
    model = copy.deepcopy(model).to(dtype).eval()
    if name == "eager NCHW":
        return lambda x: model(x)
    channels_last = model.to(memory_format=torch.channels_last)
    if name == "eager channels_last":
        return _channels_last_input(channels_last)
    if name == "torch.fx fold":
        return _channels_last_input(fx_fuse(channels_last).to(memory_format=torch.channels_last))
    if name == "compile default":
        return _compiled(channels_last, "default")
    if name == "compile freezing":
        return _compiled(channels_last, "default", freezing=True)
    if name == "compile max-autotune+freezing":
        return _compiled(channels_last, "max-autotune", freezing=True)
    if name == "compile reduce-overhead":
        return _compiled(channels_last, "reduce-overhead")
    if name == "ours auto + CUDA graph":
        return CUDAGraphModule(fuse(model, backend="auto"))
    if name == "cudnn fused":
        return _with_cudnn_autotuner(fuse(model, backend="cudnn"))
    if name in _BACKEND_OF:
        return fuse(model, backend=_BACKEND_OF[name])
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(ALL)}")
