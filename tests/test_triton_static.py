"""The Triton conv kernel compiled for A100 (sm_80) and H100 (sm_90a) with no GPU, and checked.

tools/triton_static.py compiles, for each layer of its set (each with and without the pre-activation
output, PREACT), dtype and target, the tile config that pruning keeps with the largest shared-memory
estimate, and checks every kernel it compiled: shared memory within the device's limit and within the
pruning's estimate, no register spills in fp16 and bf16, tensor-core instructions wherever the README
promises them, none in IEEE fp32. The full sweep (every config) is `python tools/triton_static.py`.

The compiler runs in a subprocess: this process runs Triton's interpreter (conftest.py), whose jit
functions cannot be compiled. A second run finds the kernels in Triton's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "triton_static.py"
ROOT = SCRIPT.parents[1]


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_pruned_configs_compile_for_sm80_and_sm90a_within_limits_without_spills():
    result = run_script("--subset", "--check", "--jobs", "2", timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    # 8 layers with and without PREACT at batch 256, layer4's 7x7 ones also at batch 1; 4 dtypes; 2 targets.
    assert summary == "checked 160 kernels: 0 violations", result.stdout
    assert "| sm_90a | fp16 | PREACT |" in result.stdout and "| sm_80 | bf16 | PREACT |" in result.stdout


def record(**fields) -> dict:
    """A kernel of the set's 3x3 layer with a tile its pruning keeps, breaking no rule unless told."""
    base = dict(layer="3x3_64", batch=256, dtype="fp16", arch=80, block_m=128, block_n=64, block_k=64, num_warps=4,
                num_stages=4, shared=16384, registers=128, spill_bytes=0, mma_sync=True, wgmma=False)
    return {**base, **fields}


# The batch tells the records apart in the checker's report (the layer's pruning does not depend on it).
BROKEN = {
    1: (dict(shared=200_000), "needs 200000 B of shared memory (limit 166912 B)"),
    2: (dict(shared=150_000), "the kernel needs 150000 B"),
    3: (dict(spill_bytes=64), "spills 64 B"),
    4: (dict(mma_sync=False), "no tensor-core instruction"),
    5: (dict(dtype="fp32-ieee", block_m=64, shared=32768), "without TF32 runs on tensor cores"),
}


def test_the_check_reports_each_kind_of_violation_and_only_those(tmp_path):
    """The checker itself, on records of kernels that break each rule and of one that breaks none
    (nothing is compiled)."""
    records = [record(batch=batch, **fields) for batch, (fields, _) in BROKEN.items()] + [record(batch=6)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_script("--table", str(path), "--check", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout.splitlines()
    for batch, (_, message) in BROKEN.items():
        assert any(line.startswith(f"3x3_64 batch {batch} ") and message in line for line in report), message
    assert not any(line.startswith("3x3_64 batch 6 ") for line in report), result.stdout
