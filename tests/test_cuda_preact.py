"""The CUDA extension's pre-activation kernels (y and z = relu(y * scale + shift) from one conv): where
the Hopper kernels write y, how both kinds store it, what the launcher checks and launches.

Without a GPU: tests/cute/preact_y_addresses.cu, compiled here and run on the CPU, checks the address
of every (m, n) of y against the dense NHWC offset, through the Hopper kernels' own types and TMA
descriptor; the machine code shows how y is stored. With a GPU (`-m gpu`): scale and shift that overlap
an output are refused, and the CUTLASS 2.x path packs its per-channel vector in one launch.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fused_resnet import self_check
from fused_resnet.call import ConvCall
from fused_resnet.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "tests" / "cute" / "preact_y_addresses.cu"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(cuda_home, "bin", "nvcc"), shutil.which("nvcc")]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def _cutlass_include_dirs() -> list[str] | None:
    """The headers of the nvidia-cutlass package, as setup.py finds them (None without the package)."""
    try:
        import cutlass_library
    except ImportError:
        return None
    source = Path(cutlass_library.__file__).parent / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    return [str(d) for d in dirs] if all(d.is_dir() for d in dirs) else None


def test_hopper_y_store_writes_every_element_at_its_dense_nhwc_offset(tmp_path):
    """12 kernels (fp16 and bf16; tiles 128x128, 128x64, 64x128; with and without a residual) on three
    layers whose M and K tiles cross image and channel ends: every element of y, one address each,
    every TMA box exactly its epilogue subtile. The control (CUTLASS's (Q, P, N) stride read against
    the linearised M, as the kernels stored y before) must go wrong on a y with padded images."""
    nvcc, includes = _nvcc(), _cutlass_include_dirs()
    if nvcc is None or includes is None:
        pytest.skip("needs nvcc and the nvidia-cutlass headers (pip install nvidia-cutlass)")
    binary = tmp_path / "preact_y_addresses"
    subprocess.run(
        [nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=sm_90a",
         *(f"-I{d}" for d in includes), f"-I{ROOT / 'csrc' / 'cuda'}", str(PROGRAM), "-o", str(binary)],
        check=True, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if " y descriptor rank 2 " in line]) == 3 * 12, result.stdout
    total = re.fullmatch(r"total: elements (\d+), address mismatches (\d+), boxes (\d+), box mismatches (\d+)", lines[-2])
    elements, mismatches, boxes, box_mismatches = map(int, total.groups())
    # N*P*Q*K of the program's layers: 3x7x7 pixels x 200 channels, 2x7x7 x 136, 5x9x5 x 64; 12 kernels each.
    assert elements == 12 * (3 * 7 * 7 * 200 + 2 * 7 * 7 * 136 + 5 * 9 * 5 * 64)
    assert mismatches == 0 and box_mismatches == 0 and boxes > 0
    control = re.fullmatch(r"control .*: dense y mismatches (\d+), padded y mismatches (\d+)", lines[-1])
    assert control is not None and int(control.group(1)) == 0 and int(control.group(2)) > 0, lines[-1]


# ---------------------------------------------------------------------------------------------
# Machine code
# ---------------------------------------------------------------------------------------------

NEEDS_CONV = pytest.mark.skipif(
    not cuda_backend.CONV_CONFIGS, reason=f"fused_resnet._C is not built with its conv kernels: {cuda_backend._LOAD_ERROR}"
)


def _stores(body: str) -> dict[str, int]:
    """Global and TMA store instructions of a kernel, by opcode with its modifiers."""
    counts: dict[str, int] = {}
    for opcode in re.findall(r"\b((?:STG|UTMASTG)\.[\w.]+)", body):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


@NEEDS_CONV
def test_hopper_preact_kernels_store_y_by_tma():
    """y leaves by a tiled TMA store (UTMASTG.2D, one per epilogue subtile, as many as z's im2col TMA
    stores), not by 32-bit global stores from registers."""
    from test_cuda_extension import _sass_functions

    if not any(name.startswith("sm90") for name in cuda_backend.CONV_CONFIGS):
        pytest.skip("the extension was built without the Hopper kernels")
    preact = {name: body for name, body in _sass_functions("sm_90a").items()
              if "ConvUniversal" in name and "PreactFusion" in name}
    assert len(preact) == 4 * 3, sorted(preact)  # fp16, bf16; with and without a residual; three tiles
    for name, body in preact.items():
        stores = _stores(body)
        assert not [op for op in stores if op.startswith("STG")], (name[:120], stores)
        assert stores.get("UTMASTG.2D", 0) == stores.get("UTMASTG.4D.IM2COL", 0) > 0, (name[:120], stores)


@NEEDS_CONV
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_the_per_channel_vector_is_packed_by_one_kernel_per_dtype(arch):
    """The CUTLASS 2.x pre-activation kernels' bias, scale and shift, one 16-byte store per channel."""
    from test_cuda_extension import _sass_functions

    functions = _sass_functions(arch)
    if arch == "sm_90a" and not any("ConvUniversal" in name for name in functions):
        pytest.skip("the extension was built without sm_90a code")
    packs = {name: body for name, body in functions.items() if "pack_preact_channels_kernel" in name}
    assert len(packs) == 2, sorted(packs)  # Half, BFloat16
    for name, body in packs.items():
        assert _stores(body) == {"STG.E.128": 1}, (name, _stores(body))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def _layer(dtype=torch.float16, channels=64, out_channels=64):
    """x, weight and two outputs of a 3x3 layer, channels_last on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, channels, 9, 11, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(out_channels, channels, 3, 3, generator=g, device="cuda") / (9 * channels) ** 0.5).to(dtype)
    x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    y, z = (torch.empty(2, out_channels, 9, 11, dtype=dtype, device="cuda", memory_format=torch.channels_last)
            for _ in range(2))
    return x, weight, y, z


def _preact_out(x, weight, bias, scale, shift, y, z, config=-1):
    torch.ops.fused_resnet_C.conv2d_preact_out(x, weight, bias, None, scale, shift, [1, 1], [1, 1], [1, 1], config, y, z)


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize("vector", ["scale", "shift"])
@pytest.mark.parametrize("output", ["y", "z"])
def test_scale_or_shift_overlapping_an_output_is_refused(vector, output):
    """The epilogue reads scale and shift while other thread blocks write y and z."""
    x, weight, y, z = _layer()
    written = {"y": y, "z": z}[output].permute(0, 2, 3, 1).reshape(-1)  # a view of the output's memory
    vectors = {"scale": torch.ones(64, dtype=x.dtype, device="cuda"), "shift": torch.zeros(64, dtype=x.dtype, device="cuda")}
    vectors[vector] = written[:64]
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        _preact_out(x, weight, None, vectors["scale"], vectors["shift"], y, z)


def _sm80_config() -> int:
    return next(i for i, name in enumerate(cuda_backend.CONV_CONFIGS) if name.startswith("optimized_128x64"))


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cutlass2_preact_reads_strided_vectors_and_no_bias(dtype):
    """The pack reads bias, scale and shift of any stride, and zeros without a bias: both outputs pass
    the parity rule, each on its own scale."""
    x, weight, y, z = _layer(dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    scale = (torch.rand(128, generator=g, device="cuda") + 0.5).to(dtype)[::2]
    shift = torch.randn(192, generator=g, device="cuda").to(dtype)[::3]
    bias = torch.randn(128, generator=g, device="cuda").to(dtype)[1::2]
    for b in (None, bias):
        _preact_out(x, weight, b, scale, shift, y, z, config=_sm80_config())
        check = self_check.preact_checker(ConvCall.of(x, weight, b, None, 1, 1, 1, 1, False, scale, shift))
        assert check((y, z)) is None


@pytest.mark.gpu
@NEEDS_CONV
def test_cutlass2_preact_launches_the_pack_and_the_conv_only():
    """Dense channels_last inputs and outputs: one pack kernel, then the conv (formerly a zeros and
    three copies before it)."""
    x, weight, y, z = _layer()
    scale, shift, bias = (torch.rand(64, device="cuda", dtype=x.dtype) for _ in range(3))
    _preact_out(x, weight, bias, scale, shift, y, z, config=_sm80_config())  # warm-up: lazy initialisation
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        _preact_out(x, weight, bias, scale, shift, y, z, config=_sm80_config())
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2 and sum("pack_preact_channels" in name for name in kernels) == 1, kernels
