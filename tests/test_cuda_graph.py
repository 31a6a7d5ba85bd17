"""CUDAGraphModule: same results as without a graph, one graph per shape, bounded cache."""

import contextlib

import pytest
import torch

import fused_resnet as fr
from fused_resnet.architectures import build


def test_rejects_cpu_tensors_and_bad_sizes():
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        fr.CUDAGraphModule(torch.nn.Identity(), max_graphs=0)
    with pytest.raises(ValueError, match="runs CUDA tensors only"):
        fr.CUDAGraphModule(torch.nn.Identity())(torch.randn(2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_graph_replay_matches_plain_forward(dtype):
    fused = fr.fuse(build("resnet18").cuda(), dtype=dtype)
    graphed = fr.CUDAGraphModule(fused, max_graphs=2)
    with torch.no_grad():
        for batch in (1, 3, 1, 5):  # a repeat, and a third shape that evicts the least recent
            x = torch.randn(batch, 3, 96, 96, device="cuda", dtype=dtype)
            expected = fused(x)
            first, second = graphed(x), graphed(x)
            assert torch.equal(first, expected) and torch.equal(second, expected)
            assert first.data_ptr() != second.data_ptr()  # fresh outputs, never overwritten
    assert len(graphed._graphs) == 2


def test_capture_and_replay_happen_on_the_input_device(monkeypatch, current_cuda_device):
    """An input on cuda:1 while cuda:0 is current (CUDA mocked: no GPU here): warm-up and capture run
    with cuda:1 current on a stream of cuda:1, and so does the replay. Captured on cuda:0's stream,
    kernels that follow their tensors' device would run outside the graph."""
    cuda1 = torch.device("cuda", 1)
    current_stream = []  # the stack of streams made current by torch.cuda.stream
    events = []

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device)

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def use_stream(s):
        current_stream.append(s)
        try:
            yield
        finally:
            current_stream.pop()

    def graph(cuda_graph, pool=None, stream=None):
        events.append(("capture", current_cuda_device.current, None if stream is None else stream.device))
        return use_stream(stream)

    class CUDAGraph:
        def replay(self):
            events.append(("replay", current_cuda_device.current))

    class Double(torch.nn.Module):
        def forward(self, x):
            events.append(("run", current_cuda_device.current, getattr(current_stream[-1] if current_stream else None, "device", None)))
            return x * 2

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: cuda1))
    for name, value in dict(
        Stream=Stream, stream=use_stream, graph=graph, CUDAGraph=CUDAGraph,
        current_stream=lambda device=None: Stream(device), graph_pool_handle=lambda: object(),
    ).items():
        monkeypatch.setattr(torch.cuda, name, value)

    graphed = fr.CUDAGraphModule(Double(), warmup=2)
    with torch.no_grad():
        out = graphed(torch.ones(3))
    on_cuda1 = ("run", cuda1, cuda1)
    assert events == [on_cuda1, on_cuda1, ("capture", cuda1, cuda1), on_cuda1, ("replay", cuda1)]
    assert current_cuda_device.current == torch.device("cuda", 0)  # restored
    assert torch.equal(out, torch.full((3,), 2.0))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_graph_on_the_second_gpu_replays_new_inputs(backend):
    """The model and its inputs on cuda:1 while cuda:0 is current: every replay computes its own input
    (a capture on cuda:0's stream would miss the kernels that follow their tensors' device, and each
    replay would return the capture-time output)."""
    if reason := fr.backends.get(backend).unavailable_reason(torch.device("cuda", 1)):
        pytest.skip(reason)
    device = torch.device("cuda", 1)
    fused = fr.fuse(build("resnet18"), backend=backend, dtype=torch.float16).to(device)
    graphed = fr.CUDAGraphModule(fused)
    with torch.cuda.device(0), torch.no_grad():
        for seed in range(3):
            x = torch.randn(2, 3, 64, 64, device=device, dtype=torch.float16, generator=torch.Generator(device).manual_seed(seed))
            assert torch.equal(graphed(x), fused(x))
