"""The command line, run as a user would run it."""

import os
import subprocess
import sys

import pytest
import torch

import fused_resnet.__main__ as cli
from fused_resnet import backends
from fused_resnet.parity import Parity


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fused_resnet", *args], capture_output=True, text=True, timeout=600)


def test_run_prints_parity_and_timings():
    result = _run("--arch", "resnet18", "--batch", "2", "--image-size", "64", "--iters", "10", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "CUDA extension: " in result.stdout
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
    result = _run("bench", "--arch", "resnet18", "--batch", str(batch), "--image-size", "32", "--iters", "10", "--device", "cpu", "--peers", "eager NCHW", "ours torch", "cudnn fused")
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
    header = result.stdout.splitlines()[:3]
    assert header[0].startswith("fused_resnet ") and "| device cpu | backends available: " in header[0]
    assert header[1].startswith("CUDA extension: ")
    assert header[2] == "2 architectures, batch 1, 48x48, float32, backend 'auto'"
    assert "0 of 2 architectures failed parity" in result.stdout


def test_readme_triton_command_on_the_cpu_is_one_line_and_exit_code_2():
    """As a user runs it, without TRITON_INTERPRET: refused at once, not after a minute of computing."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = ["run", "--arch", "resnext50_32x4d", "--batch", "8", "--dtype", "bfloat16", "--backend", "triton", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "fused_resnet", *command], capture_output=True, text=True, timeout=600, env=environ)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "python -m fused_resnet run: error: --backend triton cannot run on cpu: Triton runs on CUDA tensors, "
        "or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
    ]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: --device cuda is not a misuse here")


@pytest.fixture
def nothing_computed(monkeypatch):
    """Fails the test if a model is built: misuse must be reported before any computing."""

    def build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(cli, "build", build)


def _misuse(args, capsys) -> str:
    """The one line a misuse prints on stderr (after checking the exit code, 2, and that stdout is empty)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "resnet9000"], "verify: error: unknown architecture 'resnet9000'; known: resnet18, "),
        (["run", "--arch", "resnet9000"], "run: error: argument --arch: unknown architecture 'resnet9000'; known: resnet18, "),
        (["run", "--backend", "fast"], "run: error: argument --backend: invalid choice: 'fast'"),
        (["run", "--dtype", "int8"], "run: error: argument --dtype: invalid choice: 'int8'"),
        (["run", "--iters", "3"], "run: error: argument --iters: '3' is not an integer of at least 10"),
        (["bench", "--batch", "0"], "bench: error: argument --batch: '0' is not an integer of at least 1"),
        (["run", "--device", "tpu0"], "run: error: --device 'tpu0' is not a device; use auto, cpu, cuda or cuda:N"),
        (["run", "--device", "meta"], "run: error: --device meta: fused_resnet runs on cpu and cuda devices"),
        (["run", "--backend", "cuda", "--device", "cpu"], "run: error: --backend cuda cannot run on cpu: "),
        (["verify", "--backend", "cudnn", "--device", "cpu"], "verify: error: --backend cudnn cannot run on cpu: cuDNN runs on CUDA tensors only"),
        pytest.param(["run", "--device", "cuda"], "run: error: --device cuda: no CUDA GPU is available", marks=NO_GPU),
        pytest.param(["bench", "--device", "cuda:1"], "bench: error: --device cuda:1: no CUDA GPU is available", marks=NO_GPU),
        pytest.param(["verify", "--device", "cuda"], "verify: error: --device cuda: no CUDA GPU is available", marks=NO_GPU),
        pytest.param(["convert", "--out", "m.pt2", "--device", "cuda"], "convert: error: --device cuda: no CUDA GPU is available", marks=NO_GPU),
    ],
)
def test_misuse_is_one_line_and_exit_code_2(args, message, capsys, nothing_computed):
    assert _misuse(args, capsys).startswith(f"python -m fused_resnet {message}")


def test_triton_on_the_cpu_without_the_interpreter_is_a_misuse(capsys, monkeypatch, nothing_computed):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it for the Triton tests
    err = _misuse(["run", "--backend", "triton", "--device", "cpu"], capsys)
    assert "--backend triton cannot run on cpu: Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1" in err


def test_a_dtype_the_backend_does_not_compute_is_a_misuse(capsys, monkeypatch, nothing_computed):
    """A backend that would hand every layer of that dtype to the reference backend is refused."""
    reference = backends.get("torch")
    original = reference.conv_unsupported_reason

    def no_float16(call):
        return "no float16 here" if call.x.dtype == torch.float16 else original(call)

    monkeypatch.setattr(reference, "conv_unsupported_reason", no_float16)
    err = _misuse(["run", "--backend", "torch", "--dtype", "float16", "--device", "cpu"], capsys)
    assert err == "python -m fused_resnet run: error: --backend torch does not compute float16 convolutions: no float16 here\n"


@pytest.mark.gpu
def test_cuda_backend_in_float32_is_a_misuse_gpu(capsys, nothing_computed):
    err = _misuse(["run", "--backend", "cuda", "--dtype", "float32", "--device", "cuda"], capsys)
    assert "--backend cuda does not compute float32 convolutions: its tensor-core conv kernels take float16 and bfloat16" in err


def test_parity_failure_exits_1(monkeypatch, capsys):
    failed = Parity(torch.float32, error=1.0, eager_error=1e-7, bound=1e-5)
    monkeypatch.setattr(cli, "check_parity", lambda arch, args, generator: (failed, 0.5))
    monkeypatch.setattr(cli, "time_peers", lambda args, generator: None)
    assert cli.main(["run", "--device", "cpu", "--backend", "torch"]) == 1
    assert "-> FAIL" in capsys.readouterr().out


def test_help_says_what_it_does_and_lists_each_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "Fuses the conv + BatchNorm + ReLU" in out and "1  parity failure" in out
    for command in ("run", "bench", "verify", "convert"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 1 for line in out.splitlines()), command


def test_a_wide_timing_spread_is_warned(monkeypatch, capsys):
    monkeypatch.setattr(cli, "time_ms", lambda fn, device, iters: [10.0] * (iters // 2) + [20.0] * (iters - iters // 2))
    monkeypatch.setattr(cli.peers, "build", lambda name, model, dtype: lambda x: None)
    cli.main(["bench", "--arch", "resnet18", "--batch", "1", "--image-size", "16", "--device", "cpu", "--peers", "eager NCHW"])
    out = capsys.readouterr().out
    assert "warning: p20-p80 spread over 10% of the median (eager NCHW 67%)" in out
