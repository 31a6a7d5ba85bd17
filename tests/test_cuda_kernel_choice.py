"""Which compiled conv kernel serves a layer, and on which GPUs the extension runs, checked without a GPU.

fused_resnet_C::conv2d_kernel evaluates, from sizes alone, the rule the CUDA launcher follows (which
kernel, or why none) together with CUTLASS's own can_implement; fused_resnet_C::cuda_arch_unsupported
says whether the build has machine code for a compute capability. GPUs are described, not present:
an A100 (compute capability 8.0, 108 SMs) and an H100 (9.0, 132 SMs).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fused_resnet import backends, dispatch
from fused_resnet.call import ConvCall
from fused_resnet.architectures import ARCHITECTURES, TORCHVISION_RESNETS
from fused_resnet.backends import cuda

pytestmark = pytest.mark.skipif(
    not cuda.CONV_CONFIGS, reason=f"fused_resnet._C is not built with its conv kernels: {cuda._LOAD_ERROR}"
)

C_OPS = torch.ops.fused_resnet_C
GPUS = {"A100": (8, 0, 108), "H100": (9, 0, 132)}
DTYPES = (torch.float16, torch.bfloat16)
BATCHES = (1, 8, 256)
HOPPER = [name for name in cuda.CONV_CONFIGS if name.startswith("sm90")]


def _query(dtype, x_size, weight_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), residual=False, gpu="H100", config=-1):
    major, minor, sm_count = GPUS[gpu]
    return C_OPS.conv2d_kernel(
        dtype, list(x_size), list(weight_size), list(stride), list(padding), list(dilation), residual,
        [major, minor], sm_count, config,
    )


def _config(name: str) -> int:
    return cuda.CONV_CONFIGS.index(name)


# ---------------------------------------------------------------------------------------------
# The sweep: every conv of the ten torchvision ResNets
# ---------------------------------------------------------------------------------------------


def _convs(arch: str) -> list[tuple[tuple[int, ...], nn.Conv2d, bool]]:
    """(input shape at batch 1 and 224x224, conv, whether the fused network gives it a residual) for
    every conv of a torchvision ResNet, built and run on the meta device (no weights, no compute)."""
    constructor, kwargs = ARCHITECTURES[arch]
    with torch.device("meta"):
        model = constructor(weights=None, **kwargs).eval()
    with_residual = {id(b.conv2) for b in model.modules() if isinstance(b, BasicBlock)}
    with_residual |= {id(b.conv3) for b in model.modules() if isinstance(b, Bottleneck)}
    convs = []

    def record(module, args):
        convs.append((tuple(args[0].shape), module, id(module) in with_residual))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return convs


def test_every_resnet_conv_is_served_as_the_backend_reports(monkeypatch):
    """For each conv, batch, dtype and GPU: the extension's answer for the heuristic and for every
    kernel, against CUTLASS's can_implement and against what the backend reports (its fallback
    reason and the kernels it would time). Any mismatch is a disagreement; there must be none."""
    checked, disagreements, hopper_picks = 0, [], 0
    for gpu_name, gpu in GPUS.items():
        monkeypatch.setattr(cuda, "_gpu", lambda device, gpu=gpu: gpu)
        for arch in TORCHVISION_RESNETS:
            for shape, conv, has_residual in _convs(arch):
                for dtype in DTYPES:
                    for batch in BATCHES:
                        checked += 1
                        x = torch.empty(batch, *shape[1:], dtype=dtype, device="meta")
                        weight = torch.empty(conv.weight.shape, dtype=dtype, device="meta")
                        residual = x if has_residual else None  # only its presence counts
                        conv_args = (list(conv.stride), list(conv.padding), list(conv.dilation))
                        where = (gpu_name, arch, tuple(x.shape), tuple(weight.shape), conv_args, dtype)

                        kernel, reason, accepted = _query(dtype, x.shape, weight.shape, *conv_args, has_residual, gpu_name)
                        per_kernel = [
                            _query(dtype, x.shape, weight.shape, *conv_args, has_residual, gpu_name, i)
                            for i in range(len(cuda.CONV_CONFIGS))
                        ]
                        served = [i for i, (_, why, _) in enumerate(per_kernel) if not why]
                        call = ConvCall.of(x, weight, None, residual, *conv_args, conv.groups)
                        reported = cuda.conv_unsupported_reason(call)
                        measured = cuda._serving_configs(call)

                        if conv.groups != 1:
                            if "grouped convolution" not in reason or reported != reason or served or measured:
                                disagreements.append((where, "grouped", reason, reported, served, measured))
                            continue
                        if reason or not accepted or reported is not None:
                            disagreements.append((where, "heuristic", kernel, reason, accepted, reported))
                        if measured != served or kernel not in [cuda.CONV_CONFIGS[i] for i in served]:
                            disagreements.append((where, "serving", kernel, served, measured))
                        refused = [cuda.CONV_CONFIGS[i] for i in served if not per_kernel[i][2]]
                        if refused:
                            disagreements.append((where, "CUTLASS can_implement refuses a served kernel", refused))
                        if gpu_name == "A100" and any(cuda.CONV_CONFIGS[i] in HOPPER for i in served):
                            disagreements.append((where, "a Hopper kernel on compute capability 8.0", served))
                        hopper_picks += kernel in HOPPER
    print(f"\nconv2d_kernel sweep: {checked} (conv, batch, dtype, GPU) cases "
          f"= {checked // 2} conv x batch x dtype per GPU; Hopper kernel picked in {hopper_picks}; "
          f"disagreements: {len(disagreements)}")
    assert not disagreements, disagreements[:5]
    assert checked == 2 * len(BATCHES) * len(DTYPES) * 786  # 786 convs in the ten networks
    assert hopper_picks > 0 or not HOPPER


# ---------------------------------------------------------------------------------------------
# The rule's fixes
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HOPPER, reason="built without the Hopper kernels (TORCH_CUDA_ARCH_LIST without 9.0a)")
@pytest.mark.parametrize("stride, served", [(8, True), (9, False), (16, False)])
def test_hopper_kernels_refuse_strides_above_8(stride, served):
    """TMA im2col takes element strides up to 8; CUTLASS's check is an assert compiled out by -DNDEBUG,
    so its can_implement accepts larger ones: the rule must refuse them itself."""
    x, weight = (1, 64, 128, 128), (64, 64, 1, 1)
    for name in HOPPER:
        kernel, reason, accepted = _query(torch.float16, x, weight, (stride, stride), config=_config(name))
        assert kernel == name and accepted  # what CUTLASS alone would allow
        assert (reason == "") == served, reason
        if not served:
            assert f"strides up to 8 (TMA im2col element strides), got {stride}x{stride}" in reason
    heuristic, reason, _ = _query(torch.float16, x, weight, (stride, stride))
    assert reason == "" and (heuristic in HOPPER) == served  # a CUTLASS 2.x kernel serves the others


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("out_channels, expected_width", [(64, 64), (72, 64), (128, 128), (256, 128)])
def test_heuristic_tile_is_never_wider_than_the_output_channels(gpu, out_channels, expected_width):
    """A ResNet-50 layer1 conv at batch 256: plenty of tiles either way, so the widest tile that fits the
    output channels (a 128-wide tile on 64 channels would spend half its work on zeros)."""
    kernel, reason, accepted = _query(torch.float16, (256, 64, 56, 56), (out_channels, 64, 1, 1), gpu=gpu)
    assert reason == "" and accepted
    assert kernel.startswith("sm90" if gpu == "H100" and HOPPER else "optimized"), kernel
    tile_n = int(re.search(r"_\d+x(\d+)x\d+", kernel).group(1))  # names hold the tile, M x N x K
    assert tile_n == expected_width, kernel


def test_the_stem_goes_to_the_few_channels_kernel():
    for gpu in GPUS:
        kernel, reason, accepted = _query(torch.bfloat16, (8, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3, 3), gpu=gpu)
        assert kernel.startswith("few_channels") and reason == "" and accepted


def test_query_names_why_a_kernel_does_not_serve():
    x, weight = (2, 96, 14, 14), (64, 96, 3, 3)
    assert "at most 8 channels, x has 96" in _query(torch.float16, x, weight, config=_config("few_channels_128x64x32_4stage"))[1]
    assert "float16 and bfloat16, not float32" in _query(torch.float32, x, weight)[1]
    assert "12 output channels" in _query(torch.float16, x, (12, 96, 3, 3))[1]
    assert "grouped convolution" in _query(torch.float16, x, (64, 48, 3, 3))[1]
    assert "out of range" in _query(torch.float16, x, weight, config=len(cuda.CONV_CONFIGS))[1]
    assert "2 GiB" in _query(torch.float16, (4096, 256, 512, 512), (64, 256, 1, 1))[1]
    if HOPPER:
        hopper = _config(HOPPER[0])
        assert "multiple of 64 input channels, x has 96" in _query(torch.float16, x, weight, config=hopper)[1]
        assert "compute capability 9.0 only, the GPU has 8.0" in _query(torch.float16, x, weight, gpu="A100", config=hopper)[1]


# ---------------------------------------------------------------------------------------------
# The archs the extension was built for
# ---------------------------------------------------------------------------------------------

DEFAULT_ARCHS = "8.0;9.0a"


@pytest.mark.skipif(cuda.BUILT_ARCHS != DEFAULT_ARCHS, reason=f"built for {cuda.BUILT_ARCHS}, not {DEFAULT_ARCHS}")
@pytest.mark.parametrize(
    "capability, has_code",
    [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((7, 5), False), ((10, 0), False), ((12, 0), False)],
)
def test_cuda_backend_is_unavailable_on_a_gpu_it_has_no_code_for(capability, has_code, monkeypatch):
    """sm_80 code runs on 8.x, sm_90a code on 9.0 only; nothing runs on Blackwell (10.0, 12.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = cuda.unavailable_reason(torch.device("cuda"))
    major, minor = capability
    if has_code:
        assert reason is None
    else:
        assert f"no machine code for compute capability {major}.{minor} (sm_{major}{minor})" in reason
        assert f'built for TORCH_CUDA_ARCH_LIST="{DEFAULT_ARCHS}"' in reason
        assert f'TORCH_CUDA_ARCH_LIST="{DEFAULT_ARCHS};{major}.{minor}" make setup' in reason
    # backend="auto" leaves it out of the candidates; backend="cuda" says why it cannot run.
    assert ("cuda" in backends.available("cuda")) == has_code
    candidates = []
    serves_all = dispatch._Op("convolution", lambda b, call: None, None, None)
    call = ConvCall.of(torch.empty(1, 1, 1, 1, device="meta"), torch.empty(1, 1, 1, 1, device="meta"))
    call = call.replace(x=_OnCuda(call.x))
    dispatch._select(serves_all, "auto", call, lambda c: candidates.extend(c) or c[0])
    assert ("cuda" in [b.NAME for b in candidates]) == has_code
    if not has_code:
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cuda tensors: fused_resnet._C has no machine code"):
            dispatch._select(serves_all, "cuda", call)
    # The launcher follows the same rule: it refuses the layer, rather than fail to launch.
    query = C_OPS.conv2d_kernel(torch.float16, [1, 64, 8, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], False, list(capability), 100, -1)
    assert ("no machine code" not in query[1]) == has_code, query


class _OnCuda:
    """Stands for a tensor on a CUDA device, for the selection alone (which asks only for its device)."""

    def __init__(self, t):
        self.device, self.dtype = torch.device("cuda"), t.dtype


# ---------------------------------------------------------------------------------------------
# FUSED_RESNET_DISABLE_SM90: read by the extension only, once per process
# ---------------------------------------------------------------------------------------------

_SWITCH_PROBE = """
import torch
from fused_resnet.backends import cuda
cuda._gpu = lambda device: (9, 0, 132)
x = torch.empty(8, 64, 56, 56, dtype=torch.float16, device="meta")
w = torch.empty(64, 64, 3, 3, dtype=torch.float16, device="meta")
from fused_resnet.call import ConvCall
call = ConvCall.of(x, w, None, None, 1, 1, 1)
served = [cuda.CONV_CONFIGS[i] for i in cuda._serving_configs(call)]
print(cuda.kernel_choice(x, w, None, [1, 1], [1, 1], [1, 1])[0], ",".join(served))
"""


@pytest.mark.skipif(not HOPPER, reason="built without the Hopper kernels")
@pytest.mark.parametrize("switch", [None, "0", "1"])
def test_disable_sm90_is_read_by_the_extension_alone(switch):
    env = {k: v for k, v in os.environ.items() if k != "FUSED_RESNET_DISABLE_SM90"}
    if switch is not None:
        env["FUSED_RESNET_DISABLE_SM90"] = switch
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cuda.__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _SWITCH_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    heuristic, served = result.stdout.split()
    off = switch == "1"
    assert heuristic.startswith("optimized" if off else "sm90"), result.stdout
    assert any(name in HOPPER for name in served.split(",")) != off, result.stdout
