"""The conv kernel compiled ahead of time for real GPUs, with no GPU: what each tile config costs.

For each layer of a representative set, each dtype and each target, every tile config that the
kernel's pruning could keep (the configs shrunk to the layer, before the register and shared-memory
filters) is compiled by triton.compile for that target, specialised exactly as a launch would, and
measured: shared memory (compiled.metadata.shared, what the driver must grant), registers and spilled
bytes (`ptxas -v` with the flags of Triton's own ptxas run), tensor-core instructions in the PTX
(mma.sync, wgmma). The table and the checks then apply the kernel's pruning for each kind of device.

    python tools/triton_static.py                 # the full sweep, then the table
    python tools/triton_static.py --jobs 2 --out sweep.jsonl
    python tools/triton_static.py --table sweep.jsonl   # the table of a finished sweep

tests/test_triton_static.py compiles a subset in CI. Compiled kernels land in Triton's cache
($TRITON_CACHE_DIR, default ~/.triton/cache), so a second run only re-runs ptxas.
"""

from __future__ import annotations

import os

# The interpreter replaces @triton.jit functions by Python ones that cannot be compiled: this tool
# needs the real ones (the variable is read when triton is imported).
os.environ.pop("TRITON_INTERPRET", None)
# Triton's own ptxas run then prints its report, which saves running ptxas again (see measure).
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_resnet.backends.triton import conv  # noqa: E402
from fused_resnet.validation import conv_output_size  # noqa: E402

TARGETS = {80: "sm_80", 90: "sm_90a"}
# dtype name -> (torch dtype, tl.dot input precision): fp32 with TF32 allowed runs as tf32x3.
DTYPES = {
    "fp16": (torch.float16, "tf32"),
    "bf16": (torch.bfloat16, "tf32"),
    "fp32-tf32": (torch.float32, "tf32x3"),
    "fp32-ieee": (torch.float32, "ieee"),
}
# Where the README promises tensor cores: 16-bit types, and fp32 when TF32 is allowed.
TENSOR_CORE_DTYPES = ("fp16", "bf16", "fp32-tf32")


@dataclass(frozen=True)
class Layer:
    name: str
    channels: int
    size: int  # input height and width
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    residual: bool = False
    preact: bool = False  # the second, pre-activation output (conv.Preact)


# ResNet-50's kinds of layer, ResNeXt's grouped 3x3 and a dilated backbone's 3x3.
BASE_LAYERS = [
    Layer("stem_7x7_s2", 3, 224, 64, 7, stride=2, padding=3),
    Layer("1x1_64_256_residual", 64, 56, 256, 1, residual=True),
    Layer("3x3_64", 64, 56, 64, 3, padding=1),
    Layer("3x3_s2_128", 128, 56, 128, 3, stride=2, padding=1),
    Layer("3x3_grouped_g32", 128, 56, 128, 3, padding=1, groups=32),
    Layer("3x3_dilated_d2_512", 512, 28, 512, 3, padding=2, dilation=2),
    Layer("3x3_layer4_7x7_512", 512, 7, 512, 3, padding=1),
    Layer("1x1_layer4_7x7_512_2048_residual", 512, 7, 2048, 1, residual=True),
]
# Each also with the pre-activation output of a pre-activation ResNet (v2), the next block's BatchNorm +
# ReLU: a second store, and y's fp32 values and output offsets live until it. PREACT is a constexpr, so
# every tile pruning keeps is compiled both ways.
LAYERS = BASE_LAYERS + [replace(layer, name=layer.name + "_preact", preact=True) for layer in BASE_LAYERS]
BATCHES = (1, 256)


def layer_arguments(layer: Layer, batch: int, dtype: torch.dtype, precision: str):
    """The kernel's arguments for the layer as conv.launch builds them, on meta tensors (which bind
    as 16-byte aligned pointers, as the CUDA caching allocator's are)."""
    out_size = conv_output_size(layer.size, layer.kernel, layer.stride, layer.padding, layer.dilation)

    def channels_last(n, c, h, w):
        return torch.empty(n, c, h, w, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)

    x = channels_last(batch, layer.channels, layer.size, layer.size)
    w = torch.empty(layer.out_channels, layer.kernel, layer.kernel, layer.channels // layer.groups,
                    dtype=dtype, device="meta")
    out = channels_last(batch, layer.out_channels, out_size, out_size)
    bias = torch.empty(layer.out_channels, dtype=dtype, device="meta")
    residual = channels_last(batch, layer.out_channels, out_size, out_size) if layer.residual else None
    preact = None
    if layer.preact:
        preact = conv.Preact(bias, torch.empty_like(bias), channels_last(batch, layer.out_channels, out_size, out_size))
    pair = lambda v: (v, v)  # noqa: E731
    return conv.kernel_arguments(out, x, w, bias, residual, pair(layer.stride), pair(layer.padding),
                                 pair(layer.dilation), layer.groups, not layer.preact, precision, preact)


def candidate_configs(layer: Layer, batch: int) -> list:
    """The tile configs pruning starts from for this layer: shrunk to it, before the register and
    shared-memory filters."""
    args, constexprs = layer_arguments(layer, batch, torch.float16, "tf32")
    return conv.shrunk_configs(*conv.problem_size(conv.named_arguments(args, constexprs)))


@dataclass(frozen=True)
class Job:
    """One tile config of one layer, dtype and target, at the batches whose pruning starts from it."""

    layer: Layer
    batches: tuple[int, ...]
    dtype: str
    arch: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def jobs_for(layers, batches, dtypes, archs) -> list[Job]:
    jobs = []
    for layer in layers:
        tiles = {}
        for batch in batches:
            for config in candidate_configs(layer, batch):
                tiles.setdefault(tile_of(config), []).append(batch)
        jobs.extend(Job(layer, tuple(tile_batches), dtype, arch, *tile)
                    for tile, tile_batches in tiles.items() for dtype in dtypes for arch in archs)
    return jobs


def compile_kernel(job: Job, batch: int):
    """triton.compile for the job's target, with the arguments bound as a launch binds them."""
    dtype, precision = DTYPES[job.dtype]
    args, constexprs = layer_arguments(job.layer, batch, dtype, precision)
    kwargs = {**constexprs, "BLOCK_M": job.block_m, "BLOCK_N": job.block_n, "BLOCK_K": job.block_k,
              "num_warps": job.num_warps, "num_stages": job.num_stages}
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    kernel = conv._conv_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexpr_values, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexpr_values, attrs), target=target,
                          options=options.__dict__)


PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_usage(report: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the report of `ptxas -v`."""
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return registers, int(spills.group(1)) + int(spills.group(2))


def run_ptxas(ptx: str, arch: int) -> str:
    """The report of `ptxas -v` on the PTX, with the flags of Triton's own ptxas run."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        return subprocess.run(
            [str(PTXAS), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={TARGETS[arch]}",
             str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            check=True, capture_output=True, text=True,
        ).stderr


def measure(job: Job) -> list[dict]:
    """One record per batch of the job. Batches often specialise to the same kernel: measured once."""
    records = []
    usage = {}  # compiled kernel's hash -> (registers, spill bytes)
    for batch in job.batches:
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            compiled = compile_kernel(job, batch)
        ptx = compiled.asm["ptx"]
        if compiled.hash not in usage:
            # A kernel from Triton's cache was not assembled in this run: no report printed.
            text = report.getvalue()
            usage[compiled.hash] = ptxas_usage(text if "registers" in text else run_ptxas(ptx, job.arch))
        registers, spill_bytes = usage[compiled.hash]
        job_fields = {k: v for k, v in asdict(job).items() if k not in ("layer", "batches")}
        records.append({
            "layer": job.layer.name,
            "batch": batch,
            **job_fields,
            "shared": compiled.metadata.shared,
            "registers": registers,
            "spill_bytes": spill_bytes,
            "mma_sync": "mma.sync" in ptx,
            "wgmma": "wgmma" in ptx,
        })
    return records


def run(jobs: list[Job], workers: int, out: Path | None = None) -> list[dict]:
    """Measures every job (in `workers` processes), appending each record to `out` as it comes; a job
    whose records `out` already holds is not run again."""
    records = read_records(out) if out is not None and out.exists() else []
    done = {record_key(r) for r in records}
    todo = [job for job in jobs if not all(key in done for key in job_keys(job))]
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(out, "a")) if out is not None else None
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
        for job_records in pool.map(measure, todo):
            records.extend(job_records)
            if sink is not None:
                sink.writelines(json.dumps(r) + "\n" for r in job_records)
                sink.flush()
    wanted = {key for job in jobs for key in job_keys(job)}
    return [r for r in records if record_key(r) in wanted]


def job_keys(job: Job) -> list[tuple]:
    return [(job.layer.name, batch, job.dtype, job.arch, job.block_m, job.block_n, job.block_k, job.num_warps,
             job.num_stages) for batch in job.batches]


def record_key(record: dict) -> tuple:
    return tuple(record[k] for k in ("layer", "batch", "dtype", "arch", "block_m", "block_n", "block_k",
                                     "num_warps", "num_stages"))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Device:
    """A kind of GPU the table has a row for: its compute capability, the shared memory one program
    may use on it (the driver's maximum per block, opt-in), and the compiled code it runs (sm_86 and
    sm_89 run sm_80's pipeline)."""

    label: str
    arch: int
    shared_memory: int
    code_arch: int


DEVICES = [
    Device("sm_80", 80, 166_912, 80),
    Device("sm_86/89 (sm_80 code)", 86, 101_376, 80),
    Device("sm_90a", 90, 232_448, 90),
]


def tile_of(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
            config.num_stages)


def estimate(record: dict, arch: int) -> int:
    dtype, precision = DTYPES[record["dtype"]]
    config = triton.Config({"BLOCK_M": record["block_m"], "BLOCK_N": record["block_n"], "BLOCK_K": record["block_k"]},
                           num_warps=record["num_warps"], num_stages=record["num_stages"])
    return conv.shared_memory_estimate(config, dtype.itemsize, precision, arch)


def pruned_configs(layer: Layer, batch: int, dtype: str, device: Device) -> list:
    """The configs the kernel's pruning keeps for the layer on the device."""
    torch_dtype, precision = DTYPES[dtype]
    named = conv.named_arguments(*layer_arguments(layer, batch, torch_dtype, precision))
    return conv.fitting_configs(named, device.shared_memory, device.arch)


def kept(record: dict, device: Device) -> bool:
    layer = layer_named(record["layer"])
    tile = (record["block_m"], record["block_n"], record["block_k"], record["num_warps"], record["num_stages"])
    return tile in {tile_of(c) for c in pruned_configs(layer, record["batch"], record["dtype"], device)}


def layer_named(name: str) -> Layer:
    return next(layer for layer in LAYERS if layer.name == name)


def table(records: list[dict]) -> str:
    """Per device, dtype and epilogue (with or without PREACT), over the configs pruning keeps there:
    kernels compiled, kernels above the device's shared-memory limit, kernels that spill registers,
    kernels with tensor-core instructions; and over every compiled config, how often the pruning's
    estimate fell below the real size."""
    lines = [
        "| target | dtype | epilogue | kernels kept | over shared-memory limit | spilling"
        " | tensor-core instr. (mma.sync / wgmma) | estimate < real (all compiled) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for device in DEVICES:
        for dtype in DTYPES:
            for preact in (False, True):
                compiled = [r for r in records if r["arch"] == device.code_arch and r["dtype"] == dtype
                            and layer_named(r["layer"]).preact == preact]
                if not compiled:
                    continue
                selected = [r for r in compiled if kept(r, device)]
                lines.append(
                    f"| {device.label} | {dtype} | {'PREACT' if preact else 'plain'} | {len(selected)}"
                    f" | {sum(r['shared'] > device.shared_memory for r in selected)}"
                    f" | {sum(r['spill_bytes'] > 0 for r in selected)}"
                    f" | {sum(r['mma_sync'] or r['wgmma'] for r in selected)}"
                    f" ({sum(r['mma_sync'] for r in selected)} / {sum(r['wgmma'] for r in selected)})"
                    f" | {sum(estimate(r, device.arch) < r['shared'] for r in compiled)} of {len(compiled)} |"
                )
    return "\n".join(lines)


def violations(records: list[dict]) -> list[str]:
    """What the README and the device limits promise that a compiled kernel breaks."""
    found = []
    for r in records:
        name = (f"{r['layer']} batch {r['batch']} {r['dtype']} {TARGETS[r['arch']]} tile {r['block_m']}x{r['block_n']}"
                f"x{r['block_k']} warps {r['num_warps']} stages {r['num_stages']}")
        for device in DEVICES:
            if device.code_arch != r["arch"]:
                continue
            if estimate(r, device.arch) < r["shared"]:
                found.append(f"{name}: pruning estimates {estimate(r, device.arch)} B of shared memory on"
                             f" {device.label}, the kernel needs {r['shared']} B")
            if not kept(r, device):
                continue
            if r["shared"] > device.shared_memory:
                found.append(f"{name}: kept on {device.label} but needs {r['shared']} B of shared memory"
                             f" (limit {device.shared_memory} B)")
            if r["dtype"] in ("fp16", "bf16") and r["spill_bytes"]:
                found.append(f"{name}: kept on {device.label} but spills {r['spill_bytes']} B of registers")
            if r["dtype"] in TENSOR_CORE_DTYPES and not (r["mma_sync"] or r["wgmma"]):
                found.append(f"{name}: no tensor-core instruction (mma.sync / wgmma) in the PTX")
            if r["dtype"] == "fp32-ieee" and (r["mma_sync"] or r["wgmma"]):
                found.append(f"{name}: fp32 without TF32 runs on tensor cores")
    return sorted(set(found))


def subset_jobs() -> list[Job]:
    """For CI: per layer (at batch 256, and layer4's 7x7 also at batch 1, where its tiles shrink),
    dtype and compiled target, the kept config with the largest shared-memory estimate: the one
    closest to the device's limit, and the biggest tile, where spills show first."""
    jobs = []
    for layer in LAYERS:
        for batch in (1, 256) if layer.size == 7 else (256,):
            for dtype, (torch_dtype, precision) in DTYPES.items():
                for device in DEVICES:
                    if device.arch != device.code_arch:
                        continue  # its code is compiled for the target it shares
                    largest = max(pruned_configs(layer, batch, dtype, device),
                                  key=lambda c: conv.shared_memory_estimate(c, torch_dtype.itemsize, precision,
                                                                            device.arch))
                    jobs.append(Job(layer, (batch,), dtype, device.arch, *tile_of(largest)))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--out", type=Path, help="JSON-lines file of the records (a rerun resumes it)")
    parser.add_argument("--table", type=Path, help="compile nothing: read the records of an earlier run")
    parser.add_argument("--subset", action="store_true", help="CI's subset (see subset_jobs), not the full sweep")
    parser.add_argument("--check", action="store_true", help="list the violations; exit 1 if there is one")
    options = parser.parse_args()
    if options.table is not None:
        records = read_records(options.table)
    else:
        jobs = subset_jobs() if options.subset else jobs_for(LAYERS, BATCHES, list(DTYPES), list(TARGETS))
        print(f"{len(jobs)} kernels to compile", file=sys.stderr)
        records = run(jobs, options.jobs, options.out)
    print(table(records))
    if options.check:
        found = violations(records)
        print("\n".join(found))
        print(f"checked {len(records)} kernels: {len(found)} violations")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
