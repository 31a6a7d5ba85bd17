"""The documented ways to extend the library work as documented: a backend is one row (or one
register() call) and one module (fused_resnet/backends/README.md); a fusion pattern is one row in
fused_resnet.patterns.PATTERNS."""

import sys
import types

import pytest
import torch
from torch import nn

import fused_resnet as fr
from fused_resnet import backends, dispatch, patterns
from fused_resnet.backends import reference
from fused_resnet.parity import randomize_bn_
from helpers import assert_parity


def _toy_backend(served: list) -> types.ModuleType:
    """A backend that computes a conv with the reference's ops, refuses float64, and serves no add_relu."""
    toy = types.ModuleType("toy_backend")
    toy.NAME = "toy"
    toy.unavailable_reason = lambda device: None if device.type == "cpu" else "CPU only"

    def conv_unsupported_reason(call):
        return "float64 is not for toys" if call.x.dtype == torch.float64 else None

    def conv2d_bias_act(out, call):
        served.append(call.describe())
        return out.copy_(reference.conv2d_bias_act(None, call))

    toy.conv_unsupported_reason = toy.preact_unsupported_reason = conv_unsupported_reason
    toy.conv2d_bias_act = conv2d_bias_act
    toy.conv2d_preact = lambda out, out_preact, call: reference.conv2d_preact(out, out_preact, call)
    toy.add_relu_unsupported_reason = lambda x, y: "no add_relu"
    toy.add_relu = None
    return toy


def _register_toy(monkeypatch) -> list:
    """Registers the toy backend ahead of onednn for the test; returns the list of calls it serves."""
    served = []
    monkeypatch.setitem(sys.modules, "toy_backend", _toy_backend(served))
    monkeypatch.setattr(backends, "BACKENDS", list(backends.BACKENDS))
    monkeypatch.setattr(backends, "NAMES", backends.NAMES)
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    backends.register(backends.Backend("toy", "toy_backend", ("cpu",)), before="onednn")
    return served


@pytest.fixture
def toy(monkeypatch):
    return _register_toy(monkeypatch)


def test_a_registered_backend_serves_named_and_auto(toy, generator, served_by):
    x = torch.randn(2, 5, 7, 6, generator=generator)
    weight, bias = torch.randn(4, 5, 3, 3, generator=generator), torch.randn(4, generator=generator)
    residual = torch.randn(2, 4, 7, 6, generator=generator)
    assert backends.NAMES.index("toy") < backends.NAMES.index("onednn")
    with served_by("toy"):
        out = fr.ops.conv2d_bias_act(x, weight, bias, residual, padding=1, backend="toy")
    assert_parity(out, x, weight, bias, residual, 1, 1)
    with served_by("toy"):  # first in the CPU's "auto" order now
        fr.ops.conv2d_bias_act(x, weight, bias, residual, padding=1)
    assert len(toy) == 2
    with pytest.raises(RuntimeError, match="float64 is not for toys"):  # strict mode in the suite
        fr.ops.conv2d_bias_act(x.double(), weight.double(), backend="toy")


def test_a_backend_registered_after_a_call_serves_the_next_one(monkeypatch, generator, served_by):
    """The choice kept per layer follows the registered backends: a layer called before a backend is
    registered ahead of the one that served it is served by the new one from then on."""
    x = torch.randn(2, 5, 7, 6, generator=generator)
    weight = torch.randn(4, 5, 3, 3, generator=generator)
    with served_by("onednn"):
        fr.ops.conv2d_bias_act(x, weight, padding=1)
    served = _register_toy(monkeypatch)
    with served_by("toy"):
        fr.ops.conv2d_bias_act(x, weight, padding=1)
    assert len(served) == 1


def test_a_registered_backend_is_refused_where_it_cannot_run(toy):
    with pytest.raises(ValueError, match="exists already"):
        backends.register(backends.Backend("toy", "toy_backend", ("cpu",)))
    assert "toy" in backends.available("cpu") and "toy" not in backends.available("meta")


def test_a_pattern_row_is_all_a_new_fusion_needs(monkeypatch, generator):
    """A row whose builder is ours: the graph pass finds the chain and builds the module the row names."""
    built = []

    def recorded_build(match, backend, dtype):
        built.append((type(match.conv).__name__, type(match.bn).__name__, match.relu))
        return patterns.fused_conv(match, backend, dtype)

    rows = tuple(p for p in patterns.PATTERNS if p.steps != ("bn", "relu"))
    monkeypatch.setattr(patterns, "PATTERNS", (patterns.Pattern(("bn", "relu"), recorded_build), *rows))
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval(), generator)
    fused = fr.fuse(model, backend="torch")
    assert built == [("Conv2d", "BatchNorm2d", True)]
    x = torch.randn(2, 3, 9, 9, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert dispatch.POISON_OUTPUTS is False
