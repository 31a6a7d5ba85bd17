"""The command line on timm models: inspect, and convert from a timm state_dict."""

import subprocess
import sys

import timm
import torch


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fused_resnet", *args], capture_output=True, text=True, timeout=600)


def test_inspect_prints_each_group_and_why_not():
    result = _run("inspect", "--arch", "timm:resnetv2_50")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ResNetV2: 48 groups fused, 1 left unfused; BatchNorm modules 49 -> 1"
    assert "  fused      stages.0.blocks.0.conv1" in result.stdout
    assert any("stages.2.blocks.5.conv3" in line and "stages.3.blocks.0.norm1 of it, two outputs" in line for line in lines)
    assert any("NOT fused  stages.0.blocks.0.norm1" in line and "it follows MaxPool2d, not a conv" in line for line in lines)


def test_unknown_timm_model_is_explained():
    result = _run("inspect", "--arch", "timm:resnet9000")
    assert result.returncode == 2 and "timm has no model 'resnet9000'" in result.stderr


def test_convert_reads_a_timm_state_dict(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=5).state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "model.onnx"
    result = _run("convert", "--arch", "timm:resnet18", "--weights", str(tmp_path / "weights.pt"), "--out", str(out), "--image-size", "32")
    assert result.returncode == 0, result.stderr
    assert "weights from" in result.stdout and "(5 classes)" in result.stdout
    assert "matches the fused model" in result.stdout and out.exists()
