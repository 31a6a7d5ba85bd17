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


def _timing_row(lines, peer):
    """(median ms, p20, p80, img/s, ratio vs eager) of a peer's row of the bench table."""
    (row,) = [line for line in lines if line.startswith(peer)]
    median, p20, p80, images_per_s, ratio = row[len(peer):].split()
    assert ratio.endswith("x"), row
    return float(median), float(p20), float(p80), float(images_per_s), float(ratio[:-1])


def test_bench_times_the_named_peers():
    batch = 2
    result = _run("bench", "--arch", "resnet18", "--batch", str(batch), "--image-size", "32", "--iters", "2", "--device", "cpu", "--peers", "eager NCHW", "ours torch", "cudnn fused")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    eager, ours = _timing_row(lines, "eager NCHW"), _timing_row(lines, "ours torch")
    for median, p20, p80, images_per_s, _ in (eager, ours):
        assert 0 < p20 <= median <= p80
        assert images_per_s == pytest.approx(batch / median * 1e3, rel=0.01, abs=0.1)
    assert eager[4] == 1.0
    assert ours[4] == pytest.approx(eager[0] / ours[0], rel=0.01, abs=0.01)  # the ratio is of the medians shown
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
