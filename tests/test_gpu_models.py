"""Every architecture at 224x224 on the GPU, per backend and dtype, under the parity rule.

Outputs of every fused op are poisoned with NaN before the kernel writes them, so an element a kernel
skips turns the logits NaN and fails parity.
"""

import copy
import functools

import pytest
import torch

import fused_resnet as fr
from fused_resnet import backends, ops
from fused_resnet.architectures import ARCHITECTURES, build
from fused_resnet.parity import parity, top1_agreement

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# The quick GPU set (`-m "gpu and not slow"`) covers each kind of block and conv; the rest are `slow`.
QUICK = {"resnet18", "resnet50", "resnext50_32x4d", "resnet50_dilated", "resnet50_frozen_bn"}
ARCHS = [a if a in QUICK else pytest.param(a, marks=pytest.mark.slow) for a in ARCHITECTURES]


@functools.lru_cache(maxsize=1)
def _eager(arch: str, batch: int):
    """The model, an input, its float64 reference logits and fp32 eager logits (one architecture cached)."""
    generator = torch.Generator().manual_seed(batch)
    model = build(arch, generator).cuda()
    x = torch.randn(batch, 3, 224, 224, generator=generator).cuda()
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        return model, x, reference, model(x)


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """Numerics, not speed: choose tiles and backends by rule instead of timing them (autotuning
    every layer of every model would take most of the run). The autotuned launch and every tile
    config are tested in test_triton_backend.py."""
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")


def _backends():
    return backends.NAMES if not torch.cuda.is_available() else backends.available("cuda")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_architecture_parity_on_gpu(arch, batch, backend, dtype, monkeypatch, record_property):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)
    model, x, reference, eager_fp32 = _eager(arch, batch)
    with torch.no_grad():
        eager = eager_fp32 if dtype == torch.float32 else copy.deepcopy(model).to(dtype)(x.to(dtype))
        ours = fr.fuse(model, backend=backend, dtype=dtype)(x)
    result = parity(ours, eager, reference)
    agreement = top1_agreement(ours, eager_fp32)
    record_property("parity", str(result))
    record_property("top1_agreement", agreement)
    print(f"{arch} batch {batch} {backend} {result}; top-1 agreement {agreement:.1%}")
    assert result.ok, result
