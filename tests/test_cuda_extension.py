"""The CUDA C++ extension fused_resnet._C: registration, CPU kernel, fake impls, machine code, GPU numerics.

Without a GPU (CI): the extension imports, every fused_resnet_C op has its schema and kernels, the
CPU add_relu is exact, opcheck passes on it, the fake impls give the right metadata for CUDA
tensors, and the sm_80 and sm_90 machine code uses tensor cores. With a GPU (`-m gpu`): the
CUTLASS convs and the CUDA add_relu against float64 references, with the parity rule of docs/design.md.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fused_resnet import dispatch, ops
from fused_resnet.call import ConvCall
from fused_resnet.backends import cuda as cuda_backend
from fused_resnet.parity import FLOORS, parity
from helpers import eager_conv, reference_conv

pytestmark = pytest.mark.skipif(
    cuda_backend._C is None, reason=f"fused_resnet._C is not built: {cuda_backend._LOAD_ERROR}"
)

C_OPS = torch.ops.fused_resnet_C if cuda_backend._C is not None else None
NEEDS_CONV = pytest.mark.skipif(
    not cuda_backend.CONV_CONFIGS, reason="fused_resnet._C was built without CUTLASS: no conv kernels"
)


def add_relu_reference(x, y):
    return torch.relu(x + y)


# ---------------------------------------------------------------------------------------------
# Registration (CPU)
# ---------------------------------------------------------------------------------------------

SCHEMAS = {
    "add_relu": "fused_resnet_C::add_relu(Tensor x, Tensor y) -> Tensor",
    "add_relu_out": "fused_resnet_C::add_relu_out(Tensor x, Tensor y, Tensor(a!) out) -> ()",
    "conv2d_bias_act": (
        "fused_resnet_C::conv2d_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
        "int[2] padding, int[2] dilation, bool relu, int config=-1) -> Tensor"
    ),
    "conv2d_bias_act_out": (
        "fused_resnet_C::conv2d_bias_act_out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
        "int[2] stride, int[2] padding, int[2] dilation, bool relu, int config, Tensor(a!) out) -> ()"
    ),
    "conv2d_preact_out": (
        "fused_resnet_C::conv2d_preact_out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor scale, "
        "Tensor shift, int[2] stride, int[2] padding, int[2] dilation, int config, Tensor(a!) out, "
        "Tensor(b!) out_preact) -> ()"
    ),
    "conv2d_configs": "fused_resnet_C::conv2d_configs() -> str[]",
    "conv2d_kernel": (
        "fused_resnet_C::conv2d_kernel(ScalarType dtype, int[] x_size, int[] weight_size, int[2] stride, "
        "int[2] padding, int[2] dilation, bool residual, int[2] capability, int sm_count, int config=-1) "
        "-> (str kernel, str reason, bool can_implement)"
    ),
    "conv2d_layer_unsupported": (
        "fused_resnet_C::conv2d_layer_unsupported(ScalarType dtype, int in_channels, int[] weight_size) -> str"
    ),
    "cuda_archs": "fused_resnet_C::cuda_archs() -> str",
    "cuda_arch_unsupported": "fused_resnet_C::cuda_arch_unsupported(int major, int minor) -> str",
}


def test_extension_imports():
    import fused_resnet._C as extension

    assert extension is cuda_backend._C
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if torch.cuda.is_available():
        assert reason is None or "no machine code" in reason
    else:
        assert reason == "no CUDA GPU is available"


def test_extension_records_the_archs_it_was_built_for():
    archs = C_OPS.cuda_archs()
    assert archs == cuda_backend.BUILT_ARCHS
    assert archs and all(re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", arch) for arch in archs.split(";")), archs


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_schema(name):
    assert str(getattr(C_OPS, name).default._schema) == SCHEMAS[name]


@pytest.mark.parametrize(
    "name, keys",
    [
        ("add_relu", ("CPU", "CUDA", "Autograd")),
        ("add_relu_out", ("CPU", "CUDA", "Autograd")),
        pytest.param("conv2d_bias_act", ("CUDA", "Autograd"), marks=NEEDS_CONV),
        pytest.param("conv2d_bias_act_out", ("CUDA", "Autograd"), marks=NEEDS_CONV),
        pytest.param("conv2d_preact_out", ("CUDA", "Autograd"), marks=NEEDS_CONV),
    ],
)
def test_op_kernels_registered(name, keys):
    for key in keys:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet_C::{name}", key), (name, key)


@NEEDS_CONV
def test_conv_configs():
    names = C_OPS.conv2d_configs()
    assert tuple(names) == cuda_backend.CONV_CONFIGS
    assert len(set(names)) == len(names)
    assert sum(name.startswith("optimized_") for name in names) >= 2  # a large and a small tile at least
    assert any(name.startswith("few_channels_") for name in names)


# ---------------------------------------------------------------------------------------------
# add_relu on CPU: exact, any strides, NaN propagates
# ---------------------------------------------------------------------------------------------


def _add_relu_inputs(dtype, shape, layout, generator, device="cpu"):
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    y = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "mixed":  # y laid out differently from x
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view
        x = torch.cat([x, y], dim=-1)[..., ::2]
    x[(0,) * x.dim()] = float("nan")
    return x, y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "strided"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (4, 16, 9, 9)])
def test_add_relu_cpu(dtype, layout, shape, generator):
    x, y = _add_relu_inputs(dtype, shape, layout, generator)
    expected = add_relu_reference(x, y)
    torch.testing.assert_close(C_OPS.add_relu(x, y), expected, rtol=0, atol=0, equal_nan=True)

    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    C_OPS.add_relu_out(x, y, out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out).sum() == torch.isnan(expected).sum()


def test_add_relu_cpu_rejects_mismatches():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="must have one shape"):
        C_OPS.add_relu(x, torch.randn(3, 2))
    with pytest.raises(RuntimeError):
        C_OPS.add_relu(x, torch.randn(2, 3, dtype=torch.float64))


def test_opcheck_add_relu_cpu(generator):
    x = torch.randn(2, 8, 5, 5, generator=generator)
    y = torch.randn(2, 8, 5, 5, generator=generator)
    torch.library.opcheck(C_OPS.add_relu, (x, y))
    torch.library.opcheck(C_OPS.add_relu_out, (x, y, torch.empty_like(x)))


# ---------------------------------------------------------------------------------------------
# Fake impls: CUDA tensors need no GPU under FakeTensorMode
# ---------------------------------------------------------------------------------------------


@NEEDS_CONV
def test_fake_impls_on_cuda_tensors():
    with FakeTensorMode():
        x = torch.empty(2, 64, 56, 56, dtype=torch.float16, device="cuda")
        weight = torch.empty(128, 64, 3, 3, dtype=torch.float16, device="cuda")
        bias = torch.empty(128, dtype=torch.float16, device="cuda")
        residual = torch.empty(2, 128, 28, 28, dtype=torch.float16, device="cuda")
        out = C_OPS.conv2d_bias_act(x, weight, bias, residual, [2, 2], [1, 1], [1, 1], True)
        assert out.shape == (2, 128, 28, 28) and out.dtype == torch.float16 and out.device.type == "cuda"
        assert out.is_contiguous(memory_format=torch.channels_last)
        C_OPS.conv2d_bias_act_out(x, weight, None, None, [2, 2], [1, 1], [1, 1], False, 0, out)

        total = C_OPS.add_relu(out, residual)
        assert total.shape == out.shape and total.stride() == out.stride() and total.device.type == "cuda"
        C_OPS.add_relu_out(out, residual, total)

        with pytest.raises(ValueError, match="residual must have the output's shape"):
            C_OPS.conv2d_bias_act(x, weight, bias, residual, [1, 1], [1, 1], [1, 1], True)


# What the CUDA conv kernel refuses for any batch: (x dtype, Cout, Cin of the weight, the message).
# The fakes refuse the same with the same RuntimeError; so does the real kernel (GPU test below).
KERNEL_REFUSALS = {
    "float32": (torch.float32, 64, 16, "its tensor-core conv kernels take float16 and bfloat16, not float32"),
    "cout_12": (torch.float16, 12, 16, "12 output channels: the kernels need a multiple of 8"),
    "grouped": (torch.bfloat16, 64, 8, "grouped convolution"),
}


def _refused_conv_args(case, device="cuda"):
    dtype, cout, cin, _ = KERNEL_REFUSALS[case]
    x = torch.empty(2, 16, 9, 9, dtype=dtype, device=device)
    weight = torch.empty(cout, cin, 3, 3, dtype=dtype, device=device)
    return (x, weight, None, None, [1, 1], [1, 1], [1, 1], True)


@NEEDS_CONV
@pytest.mark.parametrize("case", sorted(KERNEL_REFUSALS))
def test_fake_impls_refuse_what_the_kernel_refuses(case):
    message = KERNEL_REFUSALS[case][-1]
    with FakeTensorMode():
        args = _refused_conv_args(case)
        with pytest.raises(RuntimeError, match=message):
            C_OPS.conv2d_bias_act(*args)
        out = torch.empty(2, args[1].shape[0], 9, 9, dtype=args[0].dtype, device="cuda")
        with pytest.raises(RuntimeError, match=message):
            C_OPS.conv2d_bias_act_out(*args, -1, out)


@NEEDS_CONV
def test_fake_and_real_conv_refuse_cpu_tensors():
    x, weight = torch.randn(1, 16, 9, 9, dtype=torch.float16), torch.randn(16, 16, 3, 3, dtype=torch.float16)
    args = (x, weight, None, None, [1, 1], [1, 1], [1, 1], True)
    with pytest.raises(RuntimeError, match="'fused_resnet_C::conv2d_bias_act' with arguments from the 'CPU' backend"):
        C_OPS.conv2d_bias_act(*args)  # the real op has no CPU kernel
    with FakeTensorMode():
        fake_args = (torch.empty(x.shape, dtype=x.dtype), torch.empty(weight.shape, dtype=weight.dtype), *args[2:])
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor, got one on cpu"):
            C_OPS.conv2d_bias_act(*fake_args)


# ---------------------------------------------------------------------------------------------
# Autograd: the functional ops have derivatives, the out= forms refuse backward
# ---------------------------------------------------------------------------------------------


def test_add_relu_gradients_cpu(generator):
    x = torch.randn(2, 8, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 8, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(C_OPS.add_relu, (x, y))
    torch.library.opcheck(C_OPS.add_relu, (x, y))  # with inputs requiring grad: checks the registration


@pytest.mark.parametrize("name", ["add_relu_out", pytest.param("conv2d_bias_act_out", marks=NEEDS_CONV)])
def test_out_forms_refuse_arguments_that_require_grad(name, generator):
    """No derivative: refused at the call, as aten's out= ops do, rather than an output that autograd
    would take for a constant (its gradient silently lost)."""
    x = torch.randn(1, 8, 5, 5, generator=generator, requires_grad=True)
    if name == "add_relu_out":
        args = (x, torch.randn(1, 8, 5, 5), torch.empty(1, 8, 5, 5))
    else:
        args = (x, torch.randn(8, 8, 1, 1), None, None, [1, 1], [0, 0], [1, 1], True, -1, torch.empty(1, 8, 5, 5))
    with pytest.raises(RuntimeError, match=f"fused_resnet_C::{name}: the out= form has no derivative"):
        getattr(C_OPS, name)(*args)


def test_add_relu_out_runs_without_grad_mode(generator):
    x = torch.randn(1, 8, 5, 5, generator=generator, requires_grad=True)
    y = torch.randn(1, 8, 5, 5, generator=generator)
    out = torch.empty(1, 8, 5, 5)
    with torch.no_grad():
        C_OPS.add_relu_out(x, y, out)
    torch.testing.assert_close(out, add_relu_reference(x.detach(), y), rtol=0, atol=0)


@NEEDS_CONV
@pytest.mark.parametrize("relu", [True, False])
def test_conv_derivative(relu, generator):
    """The derivative registered for fused_resnet_C::conv2d_bias_act, checked numerically in float64
    on the CPU: a reference forward stands in for the CUDA kernel, registered for this test only.
    (Fake CUDA tensors cannot run backward: the autograd engine needs a driver for CUDA devices.)"""
    library = torch.library.Library("fused_resnet_C", "IMPL")
    try:
        library.impl("conv2d_bias_act", lambda x, w, b, r, s, p, d, act, config=-1: reference_conv(x, w, b, r, s, p, d, relu=act), "CPU")
        x = torch.randn(2, 3, 7, 6, generator=generator, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
        residual = torch.randn(2, 4, 4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
        conv = lambda *t: C_OPS.conv2d_bias_act(*t, [2, 2], [1, 0], [1, 1], relu)  # noqa: E731
        torch.autograd.gradcheck(conv, (x, weight, bias, residual))
    finally:
        library._destroy()


# ---------------------------------------------------------------------------------------------
# Backend contract checks that need no GPU
# ---------------------------------------------------------------------------------------------


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x = torch.randn(1, 8, 5, 5)
    weight = torch.randn(8, 8, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors: .*CUDA tensors only"):
        ops.conv2d_bias_act(x, weight, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors: .*CUDA tensors only"):
        ops.add_relu(x, x, backend="cuda")


@NEEDS_CONV
@pytest.mark.parametrize(
    "dtype, cout, cin, kernel, groups, reason",
    [
        (torch.float32, 64, 64, 3, 1, "float16 and bfloat16, not float32"),
        (torch.float64, 64, 64, 3, 1, "float16 and bfloat16, not float64"),
        (torch.float16, 64, 32, 3, 2, "grouped convolution"),
        (torch.bfloat16, 12, 64, 3, 1, "12 output channels"),
        (torch.float16, 64, 64, 33, 1, "33x33 kernel"),
    ],
)
def test_conv_unsupported_reasons(dtype, cout, cin, kernel, groups, reason):
    x = torch.empty(1, cin * groups, 40, 40, dtype=dtype)
    weight = torch.empty(cout, cin, kernel, kernel, dtype=dtype)
    got = cuda_backend.conv_unsupported_reason(ConvCall.of(x, weight, None, None, 1, 1, 1, groups))
    assert got is not None and reason in got


# ---------------------------------------------------------------------------------------------
# Machine code
# ---------------------------------------------------------------------------------------------


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    try:  # triton wheels bundle one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def _sass_functions(arch):
    """{mangled name: disassembly} of the extension's kernels for `arch` (skips without cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or the triton wheel)")
    library = cuda_backend._C.__file__
    sass = subprocess.run([tool, "-sass", "-arch", arch, library], capture_output=True, text=True, check=True).stdout
    # Each kernel's disassembly starts with "Function : <mangled name>"; split the listing there.
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, flags=re.S))


@NEEDS_CONV
def test_sm90_machine_code_uses_tensor_cores():
    library = cuda_backend._C.__file__
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or the triton wheel)")
    listing = subprocess.run([tool, "-lelf", library], capture_output=True, text=True, check=True).stdout
    arch = "sm_90a" if "sm_90a" in listing else "sm_90"
    if arch not in listing:
        pytest.skip(f"{os.path.basename(library)} has no sm_90 code (TORCH_CUDA_ARCH_LIST at build time)")
    functions = _sass_functions(arch)
    hopper = [name for name in cuda_backend.CONV_CONFIGS if name.startswith("sm90")]
    sm80_style = len(cuda_backend.CONV_CONFIGS) - len(hopper)
    # Per config and element type (fp16, bf16), with and without the pre-activation output, all on tensor
    # cores. CUTLASS 2.x kernels: sm_80-style mma.sync m16n8k16 with fp32 accumulation, HMMA.16816.F32
    # (.BF16 for bfloat16).
    convs = {name: body for name, body in functions.items() if "ImplicitGemmConvolution" in name}
    assert len(convs) == 4 * sm80_style, sorted(convs)
    for name, body in convs.items():
        assert re.search(r"HMMA\.16816\.F32", body), f"no HMMA in {name[:120]}..."
    assert sum(bool(re.search(r"HMMA\.16816\.F32\.BF16", body)) for body in convs.values()) == 2 * sm80_style
    # Hopper kernels (built with 9.0a), per config, element type, with / without a residual and with /
    # without the pre-activation output: wgmma (HGMMA) fed by TMA loads in im2col mode.
    assert bool(hopper) == (arch == "sm_90a"), (arch, hopper)
    universal = {name: body for name, body in functions.items() if "ConvUniversal" in name}
    assert len(universal) == 8 * len(hopper), sorted(universal)
    for name, body in universal.items():
        assert re.search(r"HGMMA\.\d+x\d+x16\.F32", body), f"no HGMMA in {name[:120]}..."
        assert re.search(r"UTMALDG\.4D\.IM2COL", body), f"no im2col TMA load in {name[:120]}..."
    assert sum(bool(re.search(r"HGMMA\.\S*\.BF16", body)) for body in universal.values()) == 4 * len(hopper)
    # The pre-activation kernels store the output z by an im2col TMA store and y by a tiled one.
    preact = {name: body for name, body in universal.items() if "PreactFusion" in name}
    assert len(preact) == 4 * len(hopper), sorted(universal)
    for name, body in preact.items():
        assert re.search(r"UTMASTG\.4D\.IM2COL", body) and re.search(r"UTMASTG\.2D", body), f"not both stores in {name[:120]}..."


@NEEDS_CONV
def test_sm80_preact_kernels_store_both_outputs():
    """The CUTLASS 2.x kernels with the pre-activation output (PreactChannel: bias, scale and shift per
    channel in one broadcast element) exist for every config and element type, multiply on tensor cores,
    and store 16-byte vectors of both outputs: twice the STG.E.128 of the same kernel without it."""
    functions = _sass_functions("sm_80")
    convs = {name: body for name, body in functions.items() if "ImplicitGemmConvolution" in name}

    def key(name):  # threadblock tile (M, N, K) and element type
        return re.search(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", name).groups(), "bfloat16" in name

    plain = {key(name): body for name, body in convs.items() if "PreactChannel" not in name}
    preact = {key(name): body for name, body in convs.items() if "PreactChannel" in name}
    sm80_style = len([name for name in cuda_backend.CONV_CONFIGS if not name.startswith("sm90")])
    assert len(plain) == len(preact) == 2 * sm80_style and preact.keys() == plain.keys(), sorted(convs)
    for kernel, body in preact.items():
        assert re.search(r"HMMA\.16816\.F32", body), kernel
        stores = len(re.findall(r"STG\.E\.128", body))
        assert stores > 0 and stores == 2 * len(re.findall(r"STG\.E\.128", plain[kernel])), (kernel, stores)


def test_add_relu_kernel_does_not_read_through_the_read_only_cache():
    """out may alias x or y (add_relu_out(x, y, x)): the kernel must not load them as read-only data
    (LDG ... .CONSTANT, what __restrict__ const pointers allow), which a concurrent write makes stale."""
    functions = _sass_functions("sm_80")
    kernels = {name: body for name, body in functions.items() if "add_relu_kernel" in name}
    assert len(kernels) >= 8, sorted(functions)[:10]  # 4 dtypes x (vectorised, scalar)
    for name, body in kernels.items():
        loads = re.findall(r"LDG\.E\S*", body)
        assert loads, f"no global loads in {name}"
        assert not [load for load in loads if "CONSTANT" in load], (name, loads)


# ---------------------------------------------------------------------------------------------
# GPU: the CUTLASS convs
# ---------------------------------------------------------------------------------------------

# name: (Cin, Cout, (R, S), stride, padding, dilation, (H, W))
LAYERS = {
    "stem_7x7_s2_c3": (3, 64, (7, 7), (2, 2), (3, 3), (1, 1), (224, 224)),
    "1x1_c64_k256": (64, 256, (1, 1), (1, 1), (0, 0), (1, 1), (56, 56)),
    "1x1_c256_k64": (256, 64, (1, 1), (1, 1), (0, 0), (1, 1), (56, 56)),
    "3x3_s1_c64": (64, 64, (3, 3), (1, 1), (1, 1), (1, 1), (56, 56)),
    "3x3_s2_c128": (128, 128, (3, 3), (2, 2), (1, 1), (1, 1), (56, 56)),
    "downsample_1x1_s2": (256, 512, (1, 1), (2, 2), (0, 0), (1, 1), (56, 56)),
    "3x3_c512_7x7": (512, 512, (3, 3), (1, 1), (1, 1), (1, 1), (7, 7)),
    "1x1_c2048_k512_7x7": (2048, 512, (1, 1), (1, 1), (0, 0), (1, 1), (7, 7)),
    "3x3_dilated_2": (256, 256, (3, 3), (1, 1), (2, 2), (2, 2), (28, 28)),
    "3x3_c12_k16": (12, 16, (3, 3), (1, 1), (1, 1), (1, 1), (20, 20)),  # C % 8 != 0, padded to 16
    "3x3_c5_k8": (5, 8, (3, 3), (1, 1), (1, 1), (1, 1), (17, 17)),  # few channels, padded to 8
    "5x3_rect_s2x1": (24, 40, (5, 3), (2, 1), (2, 0), (1, 1), (31, 17)),
}

# (bias, residual, relu)
EPILOGUES = {
    "bias_relu": (True, False, True),
    "bias_residual_relu": (True, True, True),
    "bias": (True, False, False),
    "residual": (False, True, False),
    "relu": (False, False, True),
}


def _conv_inputs(layer, batch, dtype, bias=True, residual=True, seed=0):
    cin, cout, (r, s), stride, padding, dilation, (h, w) = LAYERS[layer]
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32)  # noqa: E731
    x = randn(batch, cin, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (randn(cout, cin, r, s) / (cin * r * s) ** 0.5).to(dtype)
    b = randn(cout).to(dtype) if bias else None
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    res = randn(batch, cout, oh, ow).to(dtype).contiguous(memory_format=torch.channels_last) if residual else None
    return x, weight, b, res, dict(stride=list(stride), padding=list(padding), dilation=list(dilation))


def _assert_parity(out, x, weight, bias, residual, conv, relu):
    assert torch.isfinite(out).all(), "NaN or Inf in the output: an element was not written, or overflowed"
    ref = reference_conv(x, weight, bias, residual, relu=relu, **conv)
    eager = eager_conv(x, weight, bias, residual, relu=relu, **conv)
    result = parity(out, eager, ref)
    assert result.ok, str(result)


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_conv2d_bias_act_cuda(poisoned_outputs, layer, epilogue, batch, dtype, monkeypatch, served_by):
    has_bias, has_residual, relu = EPILOGUES[epilogue]
    x, weight, bias, residual, conv = _conv_inputs(layer, batch, dtype, has_bias, has_residual)
    assert cuda_backend.conv_unsupported_reason(ConvCall.of(x, weight, bias, residual, groups=1, **conv)) is None
    with served_by("cuda"):
        out = ops.conv2d_bias_act(x, weight, bias, residual, relu=relu, backend="cuda", **conv)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_parity(out, x, weight, bias, residual, conv, relu)


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize(
    "layer",
    ["stem_7x7_s2_c3", "3x3_s2_c128", "1x1_c256_k64", "downsample_1x1_s2", "3x3_dilated_2", "3x3_c12_k16", "3x3_c5_k8"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config_gives_the_same_answer(layer, dtype):
    x, weight, bias, residual, conv = _conv_inputs(layer, 2, dtype)
    args = (x, weight, bias, residual, conv["stride"], conv["padding"], conv["dilation"], True)
    heuristic = C_OPS.conv2d_bias_act(*args)  # config -1
    _assert_parity(heuristic, x, weight, bias, residual, conv, relu=True)
    # Any two correctly rounded results differ by rounding only.
    tolerance = dict(rtol=0, atol=2 * FLOORS[dtype] * heuristic.abs().max().item())
    for config, name in enumerate(cuda_backend.CONV_CONFIGS):
        if name.startswith("few_channels_") and x.shape[1] > 8:
            with pytest.raises(RuntimeError, match="serves inputs with at most 8 channels"):
                C_OPS.conv2d_bias_act(*args, config)
            continue
        if name.startswith("sm90") and torch.cuda.get_device_capability() != (9, 0):
            with pytest.raises(RuntimeError, match="runs on compute capability 9.0 only"):
                C_OPS.conv2d_bias_act(*args, config)
            continue
        if name.startswith("sm90") and x.shape[1] % 64:
            with pytest.raises(RuntimeError, match="needs a multiple of 64 input channels"):
                C_OPS.conv2d_bias_act(*args, config)
            continue
        out = torch.full_like(heuristic, float("nan"))
        C_OPS.conv2d_bias_act_out(*args, config, out)
        _assert_parity(out, x, weight, bias, residual, conv, relu=True)
        torch.testing.assert_close(out, heuristic, msg=name, **tolerance)


@pytest.mark.gpu
@NEEDS_CONV
def test_conv_config_out_of_range_is_an_error():
    x, weight, bias, residual, conv = _conv_inputs("3x3_s1_c64", 1, torch.float16)
    args = (x, weight, bias, residual, conv["stride"], conv["padding"], conv["dilation"], True)
    with pytest.raises(RuntimeError, match="out of range"):
        C_OPS.conv2d_bias_act(*args, len(cuda_backend.CONV_CONFIGS))


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "misaligned", "strided"])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_conv_input_layouts(layout, weight_layout, served_by):
    x, weight, bias, residual, conv = _conv_inputs("3x3_s2_c128", 2, torch.float16)
    if layout == "nchw":
        x = x.contiguous()
        residual = residual.contiguous()
    elif layout == "misaligned":  # data_ptr 2 bytes past an allocation: not 16-byte aligned
        buffer = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        x = buffer[1:].view(x.shape).copy_(x)
        bias = torch.cat([bias[:1], bias])[1:]
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    if weight_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    with served_by("cuda"):
        out = ops.conv2d_bias_act(x, weight, bias, residual, backend="cuda", **conv)
    _assert_parity(out, x, weight, bias, residual, conv, relu=True)


@pytest.mark.gpu
@NEEDS_CONV
def test_conv_sees_in_place_weight_updates(served_by):
    x, weight, bias, residual, conv = _conv_inputs("3x3_s1_c64", 1, torch.float16, residual=False)
    with served_by("cuda"):
        first = ops.conv2d_bias_act(x, weight, bias, backend="cuda", relu=False, **conv)
    _assert_parity(first, x, weight, bias, None, conv, relu=False)
    with torch.no_grad():
        weight.mul_(-2)  # same tensor, new version: a cached KRSC copy must not be reused
    with served_by("cuda"):
        second = ops.conv2d_bias_act(x, weight, bias, backend="cuda", relu=False, **conv)
    _assert_parity(second, x, weight, bias, None, conv, relu=False)


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize(
    "dtype, cout, groups, reason",
    [
        (torch.float32, 64, 1, "not torch.float32"),
        (torch.float16, 12, 1, "12 output channels"),
        (torch.float16, 64, 4, "grouped convolution"),
    ],
)
def test_unsupported_conv_falls_back_with_a_warning(dtype, cout, groups, reason, monkeypatch, fallback_allowed):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 accuracy is what is compared
    x = torch.randn(2, 32, 14, 14, device="cuda", dtype=dtype)
    weight = torch.randn(cout, 32 // groups, 3, 3, device="cuda", dtype=dtype) / 17
    with pytest.warns(UserWarning, match=reason), dispatch.record_serving() as served:
        out = ops.conv2d_bias_act(x, weight, padding=1, groups=groups, backend="cuda")
    assert served == ["torch"]
    eager = F.conv2d(x, weight, padding=1, groups=groups).relu()
    result = parity(out, eager, F.conv2d(x.double(), weight.double(), padding=1, groups=groups).relu())
    assert result.ok, str(result)


@pytest.mark.gpu
@NEEDS_CONV
def test_opcheck_conv_cuda():
    x, weight, bias, residual, conv = _conv_inputs("3x3_c12_k16", 2, torch.float16)
    args = (x, weight, bias, residual, conv["stride"], conv["padding"], conv["dilation"], True)
    torch.library.opcheck(C_OPS.conv2d_bias_act, args + (-1,))
    out = C_OPS.conv2d_bias_act(*args)
    torch.library.opcheck(C_OPS.conv2d_bias_act_out, args + (-1, torch.empty_like(out)))


# ---------------------------------------------------------------------------------------------
# GPU: add_relu
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1023, 4099, (1 << 20) + 5])
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 0, 0), (0, 3, 0), (0, 0, 5), (2, 2, 2)])
def test_add_relu_cuda_flat(dtype, numel, offsets):
    """Sizes around the 16-byte vector width, and element offsets that break its alignment."""
    g = torch.Generator(device="cuda").manual_seed(numel)
    views = []
    for offset in offsets:
        buffer = torch.randn(numel + offset, generator=g, device="cuda").to(dtype)
        views.append(buffer[offset:])
    x, y, out = views
    x[numel // 2] = float("nan")
    out.fill_(float("nan"))
    C_OPS.add_relu_out(x, y, out)
    expected = add_relu_reference(x, y)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out).sum() == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "strided"])
def test_add_relu_cuda_layouts(dtype, layout, served_by):
    x, y = _add_relu_inputs(dtype, (3, 24, 7, 9), layout, torch.Generator().manual_seed(1), device="cuda")
    torch.testing.assert_close(C_OPS.add_relu(x, y), add_relu_reference(x, y), rtol=0, atol=0, equal_nan=True)
    with served_by("cuda"):
        out = ops.add_relu(x, y, backend="cuda")
    torch.testing.assert_close(out, add_relu_reference(x, y), rtol=0, atol=0, equal_nan=True)
    out = torch.full((3, 24, 7, 18), float("nan"), dtype=dtype, device="cuda")[..., ::2]  # not dense
    C_OPS.add_relu_out(x, y, out)
    torch.testing.assert_close(out, add_relu_reference(x, y), rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("into", ["x", "y"])
def test_add_relu_cuda_in_place(into):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(3, 64, 33, 17, generator=g, device="cuda", dtype=torch.float16)
    y = torch.randn(3, 64, 33, 17, generator=g, device="cuda", dtype=torch.float16)
    expected = add_relu_reference(x, y)
    out = x if into == "x" else y
    C_OPS.add_relu_out(x, y, out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
@NEEDS_CONV
@pytest.mark.parametrize("case", sorted(KERNEL_REFUSALS))
def test_cuda_kernel_refuses_what_the_fakes_refuse(case):
    args = _refused_conv_args(case)
    with pytest.raises(RuntimeError, match=KERNEL_REFUSALS[case][-1]):
        C_OPS.conv2d_bias_act(*args)


@pytest.mark.gpu
@NEEDS_CONV
def test_conv_gradients_cuda():
    x, weight, bias, residual, conv = _conv_inputs("3x3_s2_c128", 2, torch.float32)
    f64 = [t.double().requires_grad_() for t in (x, weight, bias, residual)]
    half = [t.half().requires_grad_() for t in (x, weight, bias, residual)]
    out = C_OPS.conv2d_bias_act(*half, conv["stride"], conv["padding"], conv["dilation"], True)
    ref = reference_conv(*f64, relu=True, **conv)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, half, grad.half()), torch.autograd.grad(ref, f64, grad)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.gpu
def test_opcheck_add_relu_cuda():
    x = torch.randn(2, 8, 5, 5, device="cuda", dtype=torch.float16)
    y = torch.randn(2, 8, 5, 5, device="cuda", dtype=torch.float16)
    torch.library.opcheck(C_OPS.add_relu, (x, y))
    torch.library.opcheck(C_OPS.add_relu_out, (x, y, torch.empty_like(x)))

