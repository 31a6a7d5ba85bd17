"""The Triton conv kernel compiled for A100 (sm_80) and H100 (sm_90a) with no GPU, and checked.

tests/triton_static.py compiles, for each layer of its set, dtype and target, the tile config that
pruning keeps with the largest shared-memory estimate, and checks every kernel it compiled: shared
memory within the device's limit and within the pruning's estimate, no register spills in fp16 and
bf16, tensor-core instructions wherever the README promises them, none in IEEE fp32. The full sweep
(every config) is `python tests/triton_static.py`.

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

SCRIPT = Path(__file__).with_name("triton_static.py")
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
    # 7 layers at batch 256, layer4's 7x7 also at batch 1; 4 dtypes; 2 targets.
    assert summary == "checked 64 kernels: 0 violations", result.stdout


def record(**fields) -> dict:
    """A kernel of the set's 3x3 layer with a tile its pruning keeps, breaking no rule unless told."""
    base = dict(layer="3x3_64", batch=256, dtype="fp16", arch=80, block_m=128, block_n=64, block_k=64, num_warps=4,
                num_stages=4, shared=16384, registers=128, spill_bytes=0, mma_sync=True, wgmma=False)
    return {**base, **fields}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(shared=200_000), "needs 200000 B of shared memory (limit 166912 B)"),
        (dict(shared=150_000), "the kernel needs 150000 B"),
        (dict(spill_bytes=64), "spills 64 B"),
        (dict(mma_sync=False), "no tensor-core instruction"),
        (dict(dtype="fp32-ieee", block_m=64, shared=32768), "without TF32 runs on tensor cores"),
    ],
    ids=["over_the_limit", "above_the_estimate", "spills", "no_tensor_cores", "ieee_on_tensor_cores"],
)
def test_the_check_reports_each_kind_of_violation(tmp_path, fields, message):
    """The checker itself, on records of kernels that break each rule (nothing is compiled)."""
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record(**fields)) + "\n")
    result = run_script("--table", str(records), "--check", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout


def test_a_kernel_that_keeps_every_rule_passes_the_check(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record()) + "\n")
    result = run_script("--table", str(records), "--check", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
