"""The benchmark writer: files of a run, and the README section showing the newest GPU run of each benchmark
and the newest CPU run of the end-to-end one."""

import json

import torch

from benchmarks import results_io

from fused_resnet import cpu_isa  # noqa: E402

README = """# Project

Intro.

<!-- newest results: written by benchmarks/results_io.py -->
stale text
<!-- end of newest results -->

## After
"""


def _run(results, name, time, device, summary):
    device_type = "cpu" if device.startswith("AMD") else "cuda"
    env = {**results_io.environment(torch.device("cpu")), "device_type": device_type, "device": device, "time": time}
    rows = [{"batch": 1, "impl": "ours", "median_ms": 1.5}]
    results_io.write(name, rows, ["batch", "impl", "median_ms"], env, summary)


def test_readme_shows_the_newest_gpu_run_of_each_benchmark_and_the_newest_cpu_run(tmp_path, monkeypatch):
    results, readme = tmp_path / "benchmarks" / "results", tmp_path / "README.md"
    readme.write_text(README)
    monkeypatch.setattr(results_io, "RESULTS", results)
    monkeypatch.setattr(results_io, "README", readme)
    _run(results, "end_to_end", "2026-01-01T00:00:00+00:00", "NVIDIA H100 80GB HBM3", "- old summary")
    _run(results, "end_to_end", "2026-02-01T00:00:00+00:00", "NVIDIA H100 80GB HBM3", "- new summary")
    _run(results, "end_to_end", "2026-02-15T00:00:00+00:00", "AMD EPYC (AVX512-BF16, no AMX)", "- old CPU run")
    _run(results, "end_to_end", "2026-03-01T00:00:00+00:00", "AMD EPYC (AVX512-BF16, no AMX)", "- new CPU run")
    _run(results, "per_layer", "2026-01-15T00:00:00+00:00", "NVIDIA H100 80GB HBM3", "- per-layer summary")
    _run(results, "per_layer", "2026-03-15T00:00:00+00:00", "AMD EPYC (AVX512-BF16, no AMX)", "- per-layer CPU run")
    text = readme.read_text()
    assert text.startswith("# Project\n\nIntro.\n\n") and text.endswith("\n\n## After\n")
    section = text.split(results_io.SECTION_START)[1].split(results_io.SECTION_END)[0]
    assert "stale text" not in section and "old summary" not in section and "old CPU run" not in section
    assert "- new summary" in section and "- per-layer summary" in section and "- new CPU run" in section
    assert "per-layer CPU run" not in section  # per-layer times mean GPU time; a CPU run is not shown
    assert "(benchmarks/results/end_to_end-2026-02-01T000000Z.md)" in section
    assert "(benchmarks/results/end_to_end-2026-03-01T000000Z.md)" in section
    assert "NVIDIA H100 80GB HBM3" in section
    assert f"AMD EPYC (AVX512-BF16, no AMX), {torch.get_num_threads()} threads" in section
    cpu_run = json.loads((results / "end_to_end-2026-03-01T000000Z.json").read_text())[0]
    assert cpu_run["device_type"] == "cpu" and cpu_run["cpu_isa"] == cpu_isa.describe()
    assert f"oneDNN at {cpu_isa.describe()}, torch" in section  # the instruction-set level the CPU run ran at


def test_runs_written_before_device_type_count_as_cpu_by_their_device():
    assert results_io._ran_on_cpu({"device": "cpu"}) and not results_io._ran_on_cpu({"device": "NVIDIA H100"})


def test_readme_without_runs_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert results_io.update_readme(readme, tmp_path / "results")
    assert "No run is committed yet." in readme.read_text()


def test_readme_without_the_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    assert not results_io.update_readme(readme, tmp_path / "results")
    assert readme.read_text() == "# Project\n"
