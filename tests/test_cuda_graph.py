"""CUDAGraphModule: same results as without a graph, one graph per shape, bounded cache."""

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
