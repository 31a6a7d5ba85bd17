"""The self-check of conv2d_preact holds each output to the parity rule on its own scale.

In a pre-activation stream y (the block's sum) is often 10-30x larger than z (the next block's
BatchNorm + ReLU of it). A check of both together, relative to max|y|, lets a z that is a few percent
wrong everywhere pass; each output checked alone does not. Runs on the CPU with a stub backend whose
y is right and whose z is 2% off, in fp16: "auto" must exclude it and a verified named backend must
hand the layer to the reference, each with a warning that names z.
"""

import types
import warnings

import pytest
import torch

from fused_resnet import autotune, backends, dispatch, ops, self_check
from fused_resnet.backends import reference
from fused_resnet.call import ConvCall
from fused_resnet.parity import parity

STRIDE, PADDING, DILATION, GROUPS = [1, 1], [1, 1], [1, 1], 1
Z_ERROR = 1.02


def _layer(generator, dtype=torch.float16):
    """x, weight, bias, residual, scale, shift of a 3x3 layer whose y reaches about 60 and z about 3."""
    x = torch.randn(2, 16, 6, 7, generator=generator)
    weight = torch.randn(24, 16, 3, 3, generator=generator) * 1.2
    bias = torch.randn(24, generator=generator)
    residual = torch.randn(2, 24, 6, 7, generator=generator) * 8
    scale = torch.rand(24, generator=generator) * 0.03 + 0.02
    shift = torch.randn(24, generator=generator) * 0.5
    return tuple(t.to(dtype) for t in (x, weight, bias, residual, scale, shift))


def _call(args) -> ConvCall:
    x, weight, bias, residual, scale, shift = args
    return ConvCall.of(x, weight, bias, residual, STRIDE, PADDING, DILATION, GROUPS, False, scale, shift)


def _exact(args):
    """(y, z) in float64."""
    return reference.conv2d_preact(None, None, _call(args).in_dtype(torch.float64))


def _z_off_backend(calls: list) -> types.ModuleType:
    """A backend whose y is the float64 result rounded once (better than eager) and whose z is 2% off."""
    stub = types.ModuleType("stub_backend_z_off")
    stub.NAME = "z_off"
    stub.unavailable_reason = lambda device: None
    stub.preact_unsupported_reason = lambda call: None

    def conv2d_preact(out, out_preact, call):
        calls.append("z_off")
        y, z = reference.conv2d_preact(None, None, call.in_dtype(torch.float64))
        out.copy_(y)
        out_preact.copy_(z * Z_ERROR)

    stub.conv2d_preact = conv2d_preact
    return stub


@pytest.fixture
def z_off(tmp_path, monkeypatch):
    """Registers the stub as backend "z_off", first in auto's order; "auto" measures CPU tensors too.
    Returns the list of its calls."""
    calls = []
    monkeypatch.setattr(backends, "BACKENDS", list(backends.BACKENDS))  # the stub's row goes when the test ends
    monkeypatch.setattr(backends, "NAMES", backends.NAMES)
    backends.register(backends.Backend("z_off", "stub_backend_z_off", ()))
    monkeypatch.setitem(backends._loaded, "z_off", _z_off_backend(calls))
    monkeypatch.setattr(backends, "auto_order", lambda device: ("z_off", "torch"))
    monkeypatch.setattr(dispatch, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_checked_choice", {})
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_RESNET_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "environment_key", lambda device: "test machine")
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(autotune, "_warned", set())

    def median_ms(run, device):
        run()
        return 0.0  # all equal: the stub, first in order, would win on speed

    monkeypatch.setattr(autotune, "_median_ms", median_ms)
    return calls


def test_a_z_wrong_everywhere_passes_a_joint_check_but_not_its_own(generator):
    """The layer is one where the difference matters: y and z checked as one tensor pass, z alone fails."""
    args = _layer(generator)
    y_exact, z_exact = _exact(args)
    y_eager, z_eager = reference.conv2d_preact(None, None, _call(args))
    assert 10 <= y_exact.abs().max() / z_exact.abs().max() <= 30  # a pre-activation stream's proportions
    y, z = y_exact.half(), (z_exact * Z_ERROR).half()
    joint = parity(torch.stack((y, z)), torch.stack((y_eager, z_eager)), torch.stack((y_exact, z_exact)))
    assert joint.ok, str(joint)
    assert not parity(z, z_eager, z_exact).ok

    check = self_check.preact_checker(_call(args))
    reason = check((y, z))
    assert reason is not None and reason.startswith("z disagrees with the reference") and "FAIL" in reason
    assert check((y, z_exact.half())) is None  # right outputs pass
    y_off = (y_exact * 1.02).half()  # and the check of y is still there
    assert check((y_off, z_exact.half())).startswith("y disagrees")


def _run(args, backend):
    x, weight, bias, residual, scale, shift = args
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y, z = ops.conv2d_preact(x, weight, bias, residual, scale=scale, shift=shift, stride=STRIDE,
                                 padding=PADDING, dilation=DILATION, groups=GROUPS, backend=backend)
    excluded = [str(w.message) for w in record if "excluded for layer" in str(w.message)]
    return y, z, excluded


@pytest.mark.parametrize("backend", ["auto", backends.verified("z_off")])
def test_a_backend_whose_z_is_two_percent_off_is_not_trusted(z_off, generator, backend):
    args = _layer(generator)
    with dispatch.record_serving() as served:
        y, z, excluded = _run(args, backend)
    assert len(excluded) == 1 and "'z_off'" in excluded[0] and "z disagrees with the reference" in excluded[0]
    assert z_off == ["z_off"]  # run once, for its check
    assert served == ["torch"]
    eager = reference.conv2d_preact(None, None, _call(args))
    assert torch.equal(y, eager[0]) and torch.equal(z, eager[1])
    # The choice stands: the next call neither runs the stub nor warns again.
    with dispatch.record_serving() as served:
        _, _, excluded = _run(args, backend)
    assert served == ["torch"] and not excluded and z_off == ["z_off"]


def test_unchecked_the_stub_serves_its_wrong_z(z_off, generator):
    """Without a check the stub's z reaches the caller: the test above could fail."""
    args = _layer(generator)
    _, z, _ = _run(args, "z_off")
    assert not torch.allclose(z.double(), _exact(args)[1], rtol=1e-2, atol=0)
