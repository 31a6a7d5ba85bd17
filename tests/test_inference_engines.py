"""ONNX Runtime and OpenVINO as CPU peers (fused_resnet.inference_engines): skipped with the reason
when their package is missing or they lack the dtype, and where they run, computing the model's
function from the NCHW batch the benchmarks give every peer."""

import importlib.util

import pytest
import torch
from torch import nn

from fused_resnet import cpu_isa, inference_engines, peers
from fused_resnet.parity import randomize_bn_, relative_error


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return randomize_bn_(model.eval(), torch.Generator().manual_seed(1))


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    assert peers.unavailable_reason("ONNX Runtime", "cpu") == "onnxruntime is not installed (pip install onnxruntime)"
    assert peers.unavailable_reason("OpenVINO", "cpu", torch.float32) == "openvino is not installed (pip install openvino)"
    with pytest.raises(RuntimeError, match="pip install openvino"):
        peers.build("OpenVINO", _model(), torch.float32)


def test_engines_run_on_the_cpu_only():
    assert peers.unavailable_reason("OpenVINO", "cuda") == "openvino is measured on the CPU only"
    assert "ONNX Runtime" in peers.CPU and "OpenVINO" in peers.CPU


def test_onnxruntime_matches_eager_in_float32():
    pytest.importorskip("onnxruntime")
    assert peers.unavailable_reason("ONNX Runtime", "cpu", torch.bfloat16) == "ONNX Runtime's CPU provider has no bfloat16 convolution"
    model = _model()
    x = torch.randn(2, 3, 12, 10)
    run = peers.build("ONNX Runtime", model, torch.float32)
    with torch.no_grad():
        expected = model.double()(x.double())
    for batch in (x, x.contiguous(memory_format=torch.channels_last)):  # any layout in, as every peer
        out = run(batch)
        assert out.dtype == torch.float32 and out.shape == (2, 10)
        assert relative_error(out.double(), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_openvino_matches_eager_or_names_the_precision_it_lacks(dtype):
    pytest.importorskip("openvino")
    model = _model()
    reason = peers.unavailable_reason("OpenVINO", "cpu", dtype)
    if reason is not None:  # the CPU plugin does not list the precision here, or ONEDNN_MAX_CPU_ISA caps its oneDNN below it
        name = str(dtype).removeprefix("torch.")
        capped = cpu_isa.cap_setting() is not None and cpu_isa.onednn_computes(dtype) is False
        assert reason.startswith(f"OpenVINO's CPU plugin does not compute {name} on this CPU") or (
            capped and reason.startswith("OpenVINO's CPU plugin runs oneDNN, which"))
        with pytest.raises(RuntimeError, match="does not compute|leaves without it"):
            peers.build("OpenVINO", model, dtype)
        return
    x = torch.randn(2, 3, 12, 10)
    run = peers.build("OpenVINO", model, dtype)
    with torch.no_grad():
        expected = model.double()(x.double())
    first = run(x.to(dtype))
    second = run(x.to(dtype))  # one infer request, reused: the first result must not be overwritten
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    bound = 1e-5 if dtype == torch.float32 else 3e-2  # bf16/f16 rounding of inputs, weights and activations
    assert relative_error(first.double(), expected) < bound


def test_a_dtype_an_engine_lacks_is_refused_at_build():
    pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match="no float16 convolution"):
        inference_engines.build("onnxruntime", _model(), torch.float16)


def test_openvino_under_a_cap_that_leaves_out_a_precision_is_skipped_with_the_cap(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(cpu_isa, "cap_setting", lambda environ=None: ("ONEDNN_MAX_CPU_ISA", "AVX2"))
    monkeypatch.setattr(cpu_isa, "onednn_computes", lambda dtype: dtype == torch.float32)
    reason = peers.unavailable_reason("OpenVINO", "cpu", torch.bfloat16)
    if "does not compute" in reason:  # this CPU lacks bfloat16 altogether: the plugin says so first
        return
    assert "ONEDNN_MAX_CPU_ISA=AVX2 leaves without it" in reason
    assert peers.unavailable_reason("OpenVINO", "cpu", torch.float32) is None
