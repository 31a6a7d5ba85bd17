"""The end-to-end peers on the CPU through pytest-benchmark (not part of the test suite):

    python -m pytest tests/test_benchmarks.py --benchmark-enable --benchmark-only

In the suite (benchmarks disabled) each peer runs once, and its output is checked.

Small inputs, so it runs anywhere; the GPU numbers come from end_to_end.py.
"""

import pytest
import torch

from fused_resnet import peers
from fused_resnet.architectures import build
from fused_resnet.parity import relative_error

CPU_PEERS = [p for p in peers.ALL if peers.unavailable_reason(p, torch.device("cpu")) is None and "compile" not in p]


@pytest.fixture(scope="module")
def model():
    return build("resnet50", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("peer", CPU_PEERS)
def test_resnet50_cpu(benchmark, model, peer):
    if peer == "ours triton" and not benchmark.disabled:
        # Without a GPU its kernels run in the Triton interpreter (tests/conftest.py): its output is
        # checked in the suite; timing it would take tens of minutes and mean nothing.
        pytest.skip("ours triton runs in the Triton interpreter on the CPU: checked in the suite, not timed")
    run = peers.build(peer, model, torch.float32)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(x)
        benchmark.extra_info["peer"] = peer
        out = benchmark(run, x)
    assert relative_error(out, expected) < 1e-5  # relative to max|logit|: fp32 rounding only
