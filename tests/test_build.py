"""The build itself: what this machine can build or import must be there.

A silently missing extension would turn every CUDA C++ test into a skip, and a missing Triton every
Triton test. Where a CUDA toolkit is present and either a GPU or FUSED_RESNET_BUILD_CUDA=1 (CI sets
it) the extension must have been compiled (without a GPU the set-up skips it otherwise), and where torch
comes with Triton (Linux) the Triton backend must be available; FUSED_RESNET_REQUIRE_EXTENSION=0 and
FUSED_RESNET_REQUIRE_TRITON=0 say that a missing one is intended. The CPU extension is built everywhere
unless FUSED_RESNET_SKIP_CPU_BUILD=1.
"""

import os
import platform
import shutil

import pytest
import torch

from fused_resnet import cpu_extension
from fused_resnet.backends import cuda
from fused_resnet.backends import triton as triton_backend


def _has_nvcc() -> bool:
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(home and os.path.exists(f"{home}/bin/nvcc") for home in homes)


def _required(variable: str, where: bool) -> bool:
    return os.environ.get(variable, "1" if where else "0") == "1"


def _builds_extension() -> bool:
    """Whether the set-up compiles the extension here (setup.py decides the same way)."""
    return _has_nvcc() and (torch.cuda.is_available() or os.environ.get("FUSED_RESNET_BUILD_CUDA") == "1")


@pytest.mark.skipif(
    not _required("FUSED_RESNET_REQUIRE_EXTENSION", _builds_extension()),
    reason="no CUDA toolkit, or no GPU and FUSED_RESNET_BUILD_CUDA unset (or FUSED_RESNET_REQUIRE_EXTENSION=0): "
    "the extension is not built here",
)
def test_extension_was_built_with_its_conv_kernels():
    assert cuda._C is not None, f"fused_resnet._C did not load: {cuda._LOAD_ERROR}"
    assert cuda.CONV_CONFIGS, "fused_resnet._C was built without CUTLASS (pip install nvidia-cutlass)"


@pytest.mark.skipif(
    not _required("FUSED_RESNET_REQUIRE_TRITON", platform.system() == "Linux"),
    reason="torch comes without Triton here (or FUSED_RESNET_REQUIRE_TRITON=0): the Triton backend is optional",
)
def test_triton_backend_is_available():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = triton_backend.unavailable_reason(device)
    assert reason is None, f"the Triton tests would all be skipped: {reason}"


@pytest.mark.skipif(os.environ.get("FUSED_RESNET_SKIP_CPU_BUILD") == "1", reason="FUSED_RESNET_SKIP_CPU_BUILD=1: not built")
def test_cpu_extension_was_built():
    assert cpu_extension.ops() is not None, "fused_resnet._cpu did not load: make setup builds it"
