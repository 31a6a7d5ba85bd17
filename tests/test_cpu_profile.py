"""benchmarks/cpu_profile.py: oneDNN's own times are read back whole, and every convolution of a
fused network is accounted for, ONNX Runtime's included where it is installed."""

import importlib.util

import pytest
import torch

from benchmarks import cpu_profile


def test_a_convolution_problem_is_read_with_its_groups_and_counted_in_flops():
    grouped = cpu_profile.conv_shape("mb2_g32ic128oc256_ih56oh28kh3sh2dh0ph1_iw56ow28kw3sw2dw0pw1")
    assert grouped == dict(mb=2, g=32, ic=128, oc=256, ih=56, oh=28, kh=3, iw=56, ow=28, kw=3)
    assert cpu_profile.conv_flops(grouped) == 2 * 2 * 256 * 28 * 28 * (128 // 32) * 3 * 3
    plain = cpu_profile.conv_shape("mb1_ic3oc64_ih224oh112kh7sh2dh0ph3_iw224ow112kw7sw2dw0pw3")
    assert plain["g"] == 1 and cpu_profile.conv_flops(plain) == 2 * 64 * 112 * 112 * 3 * 7 * 7
    assert cpu_profile.conv_shape("64x3x7x7") is None  # a reorder's problem


def test_onednn_executions_are_captured_and_nothing_reaches_the_terminal(capfd):
    x = torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.mkldnn._reorder_convolution_weight(torch.randn(24, 16, 3, 3), [1, 1], [2, 2], [1, 1], 1, list(x.shape))

    def conv():
        torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [2, 2], [1, 1], 1, "none", [None], "")

    conv()
    capfd.readouterr()
    executions, wall = cpu_profile.onednn_executions(conv, 3)
    convolutions = [e for e in executions if e[0] == "convolution"]
    assert len(convolutions) == 3
    assert all(cpu_profile.conv_shape(problem) == dict(mb=1, g=1, ic=16, oc=24, ih=9, oh=5, kh=3, iw=9, ow=5, kw=3)
               for _, _, problem, _ in convolutions)
    assert all(ms > 0 for *_, ms in convolutions) and wall > 0
    assert "onednn_verbose" not in capfd.readouterr().out


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN")
def test_every_convolution_of_a_fused_resnet18_is_accounted_for():
    args = type("Args", (), dict(image_size=64, reps=2, calls=2, operators=3))()
    split, convs = cpu_profile.profile_case("resnet18", "float32", 1, args, ceiling=100.0)
    assert sum(row["calls"] for row in convs) == 20  # resnet18's 20 convolutions, each once a forward
    assert all(row["gflops"] > 0 for row in convs)
    ours = {row["part"]: row for row in split if row["engine"] == cpu_profile.OURS}
    assert 0 < ours["oneDNN convolution primitives"]["share"] < 1
    assert ours["wall (median)"]["ms"] > ours["oneDNN convolution primitives"]["ms"]
    engines = {row["engine"] for row in split}
    if importlib.util.find_spec("onnxruntime") is None:
        assert engines == {cpu_profile.OURS}
    else:  # every convolution found again among ONNX Runtime's Conv nodes
        assert engines == {cpu_profile.OURS, cpu_profile.ORT}
        assert all(row["ort_ms_per_call"] is not None for row in convs)
