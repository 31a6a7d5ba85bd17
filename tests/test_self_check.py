"""Self-checking backends: "auto" excludes, per layer, a candidate that raises or disagrees with the
reference; a verified named backend falls back to the reference for such a layer.

Runs on the CPU with stub backends registered for the test: one raising, one returning wrong
values, one leaving an output element unwritten, one right. "auto" measures on GPUs only; the tests
let it measure CPU tensors too (MEASURED_DEVICE_TYPES), with timings stubbed so that the bad
candidates are the fastest and only the check can keep them out.
"""

import contextlib
import copy
import json
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

import fused_resnet as fr
from fused_resnet import autotune, backends, dispatch, self_check
from fused_resnet.call import ConvCall
from fused_resnet.backends import reference
from fused_resnet.architectures import build
from fused_resnet.parity import FLOORS, parity, randomize_bn_

# Stubbed median times: the bad candidates would win on speed.
TIMES = {"raising": 0.1, "wrong": 0.2, "unwritten": 0.3, "right": 1.0, "torch": 2.0}


def _stub(name: str, calls: list) -> types.ModuleType:
    """A backend that computes the reference's values, then spoils them as its name says."""
    stub = types.ModuleType(f"stub_backend_{name}")
    stub.NAME = name
    stub.unavailable_reason = lambda device: None
    stub.conv_unsupported_reason = lambda *args: None
    stub.add_relu_unsupported_reason = lambda x, y: None

    def spoil(out, exact):
        calls.append(name)
        if name == "raising":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        if name == "unwritten":  # every element but the first of each sample
            kept = out[:, 0, 0, 0].clone()
            out.copy_(exact)
            out[:, 0, 0, 0] = kept
            return None
        out.copy_(exact * 1.001 if name == "wrong" else exact)  # 0.1% off: far beyond the parity bound
        return None

    stub.conv2d_bias_act = lambda out, *args: spoil(out, reference.conv2d_bias_act(None, *args))
    stub.add_relu = lambda out, x, y: spoil(out, (x + y).relu())
    return stub


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """Registers the stub backends; returns the list of stub calls, in order."""
    calls = []
    monkeypatch.setattr(backends, "BACKENDS", list(backends.BACKENDS))  # the stubs' rows go when the test ends
    monkeypatch.setattr(backends, "NAMES", backends.NAMES)
    for name in ("raising", "wrong", "unwritten", "right"):
        backends.register(backends.Backend(name, f"stub_backend_{name}", ()))
        monkeypatch.setitem(backends._loaded, name, _stub(name, calls))
    monkeypatch.setattr(backends, "auto_order", lambda device: ("raising", "wrong", "unwritten", "right", "torch"))
    monkeypatch.setattr(dispatch, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_checked_choice", {})
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_RESNET_AUTOTUNE", raising=False)
    monkeypatch.delenv("FUSED_RESNET_VERIFY", raising=False)
    monkeypatch.setattr(autotune, "environment_key", lambda device: "test machine")
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(autotune, "_warned", set())

    def median_ms(run, device):
        before = len(calls)
        run()
        return TIMES[calls[-1] if len(calls) > before else "torch"]

    monkeypatch.setattr(autotune, "_median_ms", median_ms)
    return calls


def _conv_args(generator, channels_last=False):
    """An odd layer: batch 1, 5 -> 6 channels, 7 x 9, stride 2, with a residual."""
    x = torch.randn(1, 5, 7, 9, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 5, 3, 3, generator=generator)
    bias, residual = torch.randn(6, generator=generator), torch.randn(1, 6, 4, 5, generator=generator)
    return x, weight, bias, residual


def _conv(x, weight, bias, residual, backend):
    return fr.ops.conv2d_bias_act(x, weight, bias, residual, stride=2, padding=1, backend=backend)


def _expected(x, weight, bias, residual):
    return (F.conv2d(x, weight, bias, stride=2, padding=1) + residual).relu()


@contextlib.contextmanager
def exclusions():
    """Records warnings; on exit, the dict it yields maps each backend excluded for a layer to the
    texts of the warnings that said so."""
    found = {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield found
    for w in record:
        text = str(w.message)
        if "excluded for layer" in text:
            found.setdefault(text.split("'")[1], []).append(text)


def warned_once_each(excluded: dict) -> list[str]:
    """The backends excluded, each warned about exactly once."""
    assert all(len(texts) == 1 for texts in excluded.values()), excluded
    return sorted(excluded)


@pytest.mark.parametrize("channels_last", [False, True])
def test_auto_excludes_candidates_that_raise_or_disagree_and_picks_a_right_one(stubs, generator, channels_last):
    args = _conv_args(generator, channels_last)
    with exclusions() as excluded:
        out = _conv(*args, backend="auto")
    assert warned_once_each(excluded) == ["raising", "unwritten", "wrong"]
    assert "no kernel image is available" in excluded["raising"][0] and "conv2d_bias_act" in excluded["raising"][0]
    assert "disagrees with the reference" in excluded["wrong"][0] and "FAIL" in excluded["wrong"][0]
    assert "error inf" in excluded["unwritten"][0]  # the NaN left in the unwritten element
    torch.testing.assert_close(out, _expected(*args))
    stored = json.loads(autotune.cache_file().read_text())["test machine"]
    (verdict,) = stored.values()
    assert verdict["choice"] == "right" and sorted(verdict["rejected"]) == ["raising", "unwritten", "wrong"]


def test_verdict_is_cached_and_never_measured_again(stubs, generator):
    args = _conv_args(generator)
    with exclusions():
        _conv(*args, backend="auto")
    stubs.clear()
    _conv(*args, backend="auto")
    assert stubs == ["right"]  # the op's own call: nothing run, checked or timed again
    # As a new process would: the choice and the exclusions are read back from the file.
    autotune.forget()
    dispatch._checked_choice.clear()
    stubs.clear()
    with exclusions() as excluded:
        out = _conv(*args, backend="auto")
    assert stubs == ["right"] and not excluded
    torch.testing.assert_close(out, _expected(*args))


def test_stored_exclusions_are_not_run_again_when_the_choice_is_gone(stubs, generator, monkeypatch):
    args = _conv_args(generator)
    with exclusions():
        _conv(*args, backend="auto")
    # "right" no longer serves: a new choice is made, without running the excluded candidates again.
    monkeypatch.setattr(backends, "auto_order", lambda device: ("raising", "wrong", "unwritten", "torch"))
    autotune.forget()
    dispatch._checked_choice.clear()
    stubs.clear()
    with exclusions():
        out = _conv(*args, backend="auto")
    assert stubs == []  # the reference computed it
    torch.testing.assert_close(out, _expected(*args))


def test_auto_checks_add_relu_too(stubs, generator):
    x, y = torch.randn(2, 3, 5, 7, generator=generator), torch.randn(2, 3, 5, 7, generator=generator)
    with exclusions() as excluded:
        out = fr.ops.add_relu(x, y, backend="auto")
    assert warned_once_each(excluded) == ["raising", "unwritten", "wrong"]
    assert "add_relu" in excluded["wrong"][0]
    assert torch.equal(out, (x + y).relu())


def test_auto_checks_even_without_measuring(stubs, generator, monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_AUTOTUNE", "0")
    args = _conv_args(generator)
    with exclusions() as excluded:
        out = _conv(*args, backend="auto")
    assert warned_once_each(excluded) == ["raising", "unwritten", "wrong"]  # then "right", the first usable
    torch.testing.assert_close(out, _expected(*args))
    assert stubs[-2:] == ["right", "right"]  # checked once, then the op's call; never timed
    assert not autotune.cache_file().exists()  # a choice made without measuring is not stored


def test_no_usable_candidate_is_a_clear_error(stubs, generator, monkeypatch):
    monkeypatch.setattr(backends, "auto_order", lambda device: ("raising", "wrong"))
    with exclusions():
        with pytest.raises(RuntimeError, match=r"no backend can compute layer .*raising: RuntimeError.*wrong: disagrees"):
            _conv(*_conv_args(generator), backend="auto")


def _block(generator) -> BasicBlock:
    """A BasicBlock with 6 channels (not a multiple of 8) and randomised BatchNorm."""
    return randomize_bn_(BasicBlock(6, 6).eval(), generator)


@pytest.mark.parametrize("bad", ["wrong", "raising", "unwritten"])
def test_verify_replaces_a_failing_named_backend_by_the_reference(stubs, generator, bad):
    block = _block(generator)
    x = torch.randn(1, 6, 5, 3, generator=generator)
    verified = fr.fuse(block, backend=bad, verify=True)
    assert verified.conv1.backend == f"verified:{bad}"
    with torch.no_grad(), exclusions() as excluded:
        out = verified(x)
        assert torch.equal(out, fr.fuse(block, backend="torch")(x))
        stubs.clear()
        assert torch.equal(verified(x), out)
    assert stubs == []  # the reference serves both layers from now on, without a new check
    assert list(excluded) == [bad] and len(excluded[bad]) == 2  # one warning per conv of the block


def test_without_verify_the_wrong_backend_is_visible(stubs, generator):
    """The stub is wrong enough to fail a plain comparison: the test above could fail."""
    block = _block(generator)
    x = torch.randn(1, 6, 5, 3, generator=generator)
    with torch.no_grad():
        unverified = fr.fuse(block, backend="wrong")(x)
        right = fr.fuse(block, backend="torch")(x)
    assert not torch.allclose(unverified, right)


def test_verify_keeps_a_right_named_backend(stubs, generator):
    block = _block(generator)
    x = torch.randn(1, 6, 5, 3, generator=generator)
    verified = fr.fuse(block, backend="right", verify=True)
    with torch.no_grad(), exclusions() as excluded:
        out = verified(x)
        assert stubs == ["right"] * 4  # each conv: its check, then the op's call
        stubs.clear()
        verified(x)
        assert stubs == ["right"] * 2
    assert not excluded
    torch.testing.assert_close(out, block(x))


def test_verify_by_environment_variable(stubs, generator, monkeypatch):
    """FUSED_RESNET_VERIFY=1 is fr.fuse's default for `verify`, read when the model is fused."""
    block = _block(generator)
    x = torch.randn(1, 6, 5, 3, generator=generator)
    monkeypatch.setenv("FUSED_RESNET_VERIFY", "1")
    verified = fr.fuse(block, backend="wrong")
    assert fr.fuse(block, backend="wrong", verify=False).conv1.backend == "wrong"
    monkeypatch.delenv("FUSED_RESNET_VERIFY")
    assert fr.fuse(block, backend="wrong").conv1.backend == "wrong"
    with torch.no_grad(), exclusions() as excluded:
        assert torch.equal(verified(x), fr.fuse(block, backend="torch")(x))
    assert list(excluded) == ["wrong"]


def test_verified_add_relu(stubs, generator):
    x, y = torch.randn(2, 3, 5, 7, generator=generator), torch.randn(2, 3, 5, 7, generator=generator)
    with exclusions() as excluded:
        summed = fr.ops.add_relu(x, y, backend=backends.verified("wrong"))
    assert warned_once_each(excluded) == ["wrong"]
    assert torch.equal(summed, (x + y).relu())
    assert not torch.equal(fr.ops.add_relu(x, y, backend="wrong"), summed)


def test_verify_is_a_bool_and_the_reference_is_not_verified():
    block = BasicBlock(4, 4).eval()
    with pytest.raises(TypeError, match="verify must be a bool or None"):
        fr.fuse(block, verify="yes")
    assert fr.fuse(block, backend="auto", verify=True).conv1.backend == "verified:auto"
    assert fr.fuse(block, backend="torch", verify=True).conv1.backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fr.fuse(block, backend="nope", verify=True)


def test_verified_model_traces_and_checks_when_it_runs(stubs, generator):
    """The check runs inside the op's eager implementation, never while tracing: torch.compile and
    torch.export see the op as it is, and the compiled or exported program checks when it runs."""
    block = _block(generator)
    x = torch.randn(2, 6, 5, 3, generator=generator)
    expected = fr.fuse(block, backend="torch")(x)
    verified = fr.fuse(block, backend="wrong", verify=True)
    with exclusions():
        compiled = torch.compile(verified, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), expected)
        dispatch._checked_choice.clear()
        program = torch.export.export(verified, (x,))
        assert torch.equal(program.module()(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_bound_is_eager_error_on_the_layer(generator, dtype):
    """A result more accurate than eager (fp32 accumulation, one rounding) passes in every dtype; one
    whose error is several times eager's fails; NaN always fails."""
    x, weight, bias, residual = (t.to(dtype) for t in _conv_args(generator))
    args = (x, weight, bias, residual, [2, 2], [1, 1], [1, 1], 1, True)
    call = ConvCall.of(*args)
    exact = reference.conv2d_bias_act(None, call.in_dtype(torch.float64))
    eager = reference.conv2d_bias_act(None, call)
    check = self_check.conv_checker(call)
    assert check(exact.to(dtype)) is None
    assert check(eager) is None
    eager_error = (eager.double() - exact).abs().max() / exact.abs().max()
    off = exact + exact.abs().max() * (4 * eager_error + 2 * FLOORS[dtype])
    assert "FAIL" in check(off.to(dtype))
    poisoned = exact.to(dtype)
    poisoned[0, 0, 0, 0] = float("nan")
    assert "FAIL" in check(poisoned)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_excludes_nothing_on_a_real_network(tmp_path, monkeypatch, generator, dtype):
    """On a GPU every backend that serves a ResNet-18 layer is checked against the reference: a kernel
    wrong on this GPU shows up here as an exclusion warning naming the layer and the backend."""
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))  # measured and checked afresh
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(dispatch, "_checked_choice", {})
    model = build("resnet18", generator).cuda()
    x = torch.randn(2, 3, 64, 64, generator=generator).cuda()
    with torch.no_grad(), exclusions() as excluded:
        out = fr.fuse(model, backend="auto", dtype=dtype)(x)
        exact = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert excluded == {}
    result = parity(out, eager, exact)
    assert result.ok, str(result)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_auto_measures_and_checks_on_the_second_gpu(tmp_path, monkeypatch, generator):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(dispatch, "_checked_choice", {})
    args = [t.to("cuda:1", torch.float16) for t in _conv_args(generator)]
    with torch.cuda.device(0), exclusions() as excluded:
        out = _conv(*args, backend="auto")
    assert excluded == {}
    (choices,) = json.loads(autotune.cache_file().read_text()).values()
    assert choices and all(c["rejected"] == {} for c in choices.values())
    assert self_check.conv_checker(ConvCall.of(*args, [2, 2], [1, 1], [1, 1], 1, True))(out) is None


def test_verified_auto_checks_the_backend_it_takes_where_it_does_not_measure(stubs, generator, monkeypatch):
    """On a device where "auto" takes the first serving backend without measuring (the CPU), a verified
    "auto" checks that backend like a named one."""
    monkeypatch.setattr(dispatch, "MEASURED_DEVICE_TYPES", ("cuda",))
    args = _conv_args(generator)
    with exclusions() as excluded:
        out = _conv(*args, backend=backends.verified("auto"))
    assert warned_once_each(excluded) == ["raising"]  # the first in auto's order; then the reference
    torch.testing.assert_close(out, _expected(*args))


def test_a_check_that_cannot_run_leaves_the_layer_to_the_reference(stubs, generator, monkeypatch):
    """The reference is never checked (it is what the others are checked against): when the check
    itself fails, say out of memory for its float64 copy, the layer still runs, on the reference."""

    def out_of_memory(*args):
        def check(output):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.60 GiB")

        return check

    monkeypatch.setattr(self_check, "conv_checker", out_of_memory)
    args = _conv_args(generator)
    with exclusions() as excluded:
        out = _conv(*args, backend="auto")
    assert warned_once_each(excluded) == ["raising", "right", "unwritten", "wrong"]
    assert "OutOfMemoryError" in excluded["right"][0]
    assert torch.equal(out, reference.conv2d_bias_act(None, ConvCall.of(*args, [2, 2], [1, 1], [1, 1], 1, True)))


@pytest.mark.parametrize(
    "groups, dilation, channels_last", [(1, 1, False), (2, 2, True), (3, 1, True)], ids=["plain", "grouped-dilated", "grouped"]
)
def test_a_right_backend_passes_its_check(generator, monkeypatch, groups, dilation, channels_last):
    """The Triton kernels (in the interpreter, on the CPU) pass the check: it does not reject right
    results, on odd shapes, grouped and dilated convs, in either layout."""
    if reason := backends.get("triton").unavailable_reason(torch.device("cpu")):
        pytest.skip(reason)
    monkeypatch.setattr(dispatch, "_checked_choice", {})
    x = torch.randn(1, 6, 7, 5, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(6, 6 // groups, 3, 3, generator=generator), torch.randn(6, generator=generator)
    residual = torch.randn(1, 6, 7, 5, generator=generator)
    with exclusions() as excluded:
        out = fr.ops.conv2d_bias_act(
            x, weight, bias, residual, padding=dilation, dilation=dilation, groups=groups,
            backend=backends.verified("triton"),
        )
    assert excluded == {}
    assert [b.NAME for b in dispatch._checked_choice.values()] == ["triton"]  # checked, and kept
    torch.testing.assert_close(out, (F.conv2d(x, weight, bias, 1, dilation, dilation, groups) + residual).relu())
