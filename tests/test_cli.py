"""The command line, run as a user would run it."""

import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fused_resnet", *args], capture_output=True, text=True, timeout=600)


def test_run_prints_parity_and_timings():
    result = _run("--arch", "resnet18", "--batch", "2", "--image-size", "64", "--iters", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "parity vs float64 eager: float32" in result.stdout and "-> ok" in result.stdout
    for row in ("eager NCHW", "eager channels_last", "ours auto"):
        assert row in result.stdout


def test_bench_times_the_named_peers():
    result = _run("bench", "--arch", "resnet18", "--batch", "1", "--image-size", "32", "--iters", "2", "--device", "cpu", "--peers", "eager NCHW", "ours torch", "cudnn fused")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("eager NCHW") and "1.00x" in line for line in lines)
    assert any(line.startswith("ours torch") and "x" in line for line in lines)
    assert any(line.startswith("cudnn fused") and "skipped: cuDNN runs on CUDA tensors only" in line for line in lines)


def test_verify_reports_each_architecture():
    result = _run("verify", "resnet18", "resnet50_dilated", "--batch", "1", "--image-size", "48", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "0 of 2 architectures failed parity" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "resnet9000"], "unknown architecture 'resnet9000'"),
        (["run", "--backend", "fast"], "invalid choice: 'fast'"),
        (["run", "--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_bad_arguments_are_explained(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr
