"""Every architecture at 224x224 on the GPU, per backend and dtype, under the parity rule.

Outputs of every fused op are poisoned with NaN before the kernel writes them, so an element a kernel
skips turns the logits NaN and fails parity. Each test checks that the backend it names computed
every layer; a (backend, dtype, architecture) whose layers the backend does not all serve is not
a test of that backend, and is left out (the CUDA C++ kernels: fp32 and grouped convolutions).
fp32 is compared with TF32 off, eager and ours alike: the claim is fp32 accuracy.
"""

import copy

import pytest
import torch

import fused_resnet as fr
from fused_resnet import backends
from fused_resnet.architectures import ARCHITECTURES, REPRESENTATIVE, build
from fused_resnet.parity import parity, top1_agreement

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BATCHES = (1, 64)
GROUPED = {arch for arch in ARCHITECTURES if arch.startswith("resnext")}


def _backends():
    return backends.NAMES if not torch.cuda.is_available() else backends.available("cuda")


def _serves_every_layer(backend: str, arch: str, dtype: torch.dtype) -> bool:
    return backend != "cuda" or (dtype != torch.float32 and arch not in GROUPED)


CASES = [
    pytest.param(arch, backend, dtype, id=f"{arch}-{backend}-{str(dtype).removeprefix('torch.')}",
                 marks=() if arch in REPRESENTATIVE else pytest.mark.slow)
    for arch in ARCHITECTURES
    for backend in _backends()
    for dtype in DTYPES
    if _serves_every_layer(backend, arch, dtype)
]


def _full_fp32():
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


@pytest.fixture(scope="module")
def eager(request):
    """One architecture, built once for all its tests (pytest groups them): the model and, per batch,
    an input, its float64 reference logits and fp32 eager logits."""
    generator = torch.Generator().manual_seed(0)
    model = build(request.param, generator).cuda()
    runs = {}
    with torch.no_grad(), _full_fp32():
        reference_model = copy.deepcopy(model).double()
        for batch in BATCHES:
            x = torch.randn(batch, 3, 224, 224, generator=generator).cuda()
            runs[batch] = x, reference_model(x.double()), model(x)
    return model, runs


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """Numerics, not speed: choose tiles and backends by rule instead of timing them (autotuning
    every layer of every model would take most of the run). The autotuned launch and every tile
    config are tested in test_triton_backend.py."""
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("eager, backend, dtype", CASES, indirect=["eager"])
def test_architecture_parity_on_gpu(poisoned_outputs, eager, backend, dtype, batch, monkeypatch, record_property, served_by):
    model, runs = eager
    x, reference, eager_fp32 = runs[batch]
    with torch.no_grad(), _full_fp32():
        eager_out = eager_fp32 if dtype == torch.float32 else copy.deepcopy(model).to(dtype)(x.to(dtype))
        fused = fr.fuse(model, backend=backend, dtype=dtype)
        with served_by(backend):
            ours = fused(x)
    result = parity(ours, eager_out, reference)
    agreement = top1_agreement(ours, eager_fp32)
    record_property("parity", str(result))
    record_property("top1_agreement", agreement)
    print(f"batch {batch} {backend} {result}; top-1 agreement {agreement:.1%}")
    assert result.ok, result
