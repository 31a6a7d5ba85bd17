"""Running a whole forward pass as one captured CUDA graph, per input shape.

At batch 1 a ResNet's time is mostly kernel launches and Python; a graph replays all of them with
one launch. Each distinct (shape, dtype, strides, device) input gets its own graph, static input
buffer and static output; the least recently used graph is dropped beyond `max_graphs`.

A graph is captured with the input's device current and on a stream of that device: kernels that
follow their tensors' device (the CUDA C++ ones) would otherwise run outside a capture made on
another device's stream, and every replay would return the capture-time output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


class CUDAGraphModule(nn.Module):
    """Wraps an inference module so that each call replays a CUDA graph captured for that input shape.

    The wrapped module must be a pure function of its input (eval mode, no data-dependent control
    flow). Outputs are fresh tensors, so a later call never overwrites an earlier result. Capture
    happens on the first call with a new shape, after warm-up calls that also let backend="auto"
    measure and cache its per-layer choices (nothing can be measured inside a capture).
    """

    def __init__(self, module: nn.Module, max_graphs: int = 8, warmup: int = 3):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.module, self.max_graphs, self.warmup = module, max_graphs, warmup
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = OrderedDict()
        # Per device: the stream that warm-up and capture run on, and one memory pool shared by all
        # graphs of this module on that device (sharing a pool asks for the same capture stream).
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, object]] = {}

    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """Warm-up calls, then the capture, on this module's stream of x's device (the current one)."""
        if x.device not in self._streams:
            self._streams[x.device] = (torch.cuda.Stream(x.device), torch.cuda.graph_pool_handle())
        stream, pool = self._streams[x.device]
        static_input = x.clone()
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):
                self.module(static_input)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream), torch.no_grad():
            static_output = self.module(static_input)
        return graph, static_input, static_output

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            raise ValueError(f"CUDAGraphModule runs CUDA tensors only, got a tensor on {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("CUDAGraphModule is for inference: call it under torch.no_grad() with inputs without grad")
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        with torch.cuda.device(x.device):
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(x)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            graph, static_input, static_output = entry
            static_input.copy_(x)
            graph.replay()
            return static_output.clone()

    def reset(self) -> None:
        """Drops every captured graph. Needed after replacing a parameter by a new tensor (a graph reads
        the old one's memory); in-place updates of the weights are seen without it."""
        self._graphs.clear()
