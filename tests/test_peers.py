"""The peers fused_resnet is benchmarked against run as their users would run them."""

import torch
from torch import nn

from fused_resnet import peers


class _RecordsCudnnAutotuner(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.benchmark)
        return x


def test_cudnn_peer_runs_with_the_cudnn_autotuner(monkeypatch):
    probe = _RecordsCudnnAutotuner()
    monkeypatch.setattr(peers, "fuse", lambda model, backend: probe if backend == "cudnn" else model)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cudnn = peers.build("cudnn fused", nn.Identity(), torch.float32)
    cudnn(torch.zeros(1))
    assert probe.seen == [True]
    assert torch.backends.cudnn.benchmark is False  # restored for the peers measured after it
