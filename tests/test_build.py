"""The build itself: where a CUDA toolkit was present, the extension must have been compiled.

A silently missing extension would turn every CUDA C++ test into a skip; CI sets
FUSED_RESNET_REQUIRE_EXTENSION=1 when nvcc is on the PATH, so that case fails here instead.
"""

import os

import pytest

from fused_resnet.backends import cuda


@pytest.mark.skipif(
    os.environ.get("FUSED_RESNET_REQUIRE_EXTENSION") != "1",
    reason="FUSED_RESNET_REQUIRE_EXTENSION is not set: the extension is optional here",
)
def test_extension_was_built_with_its_conv_kernels():
    assert cuda._C is not None, f"fused_resnet._C did not load: {cuda._LOAD_ERROR}"
    assert cuda.CONV_CONFIGS, "fused_resnet._C was built without CUTLASS (pip install nvidia-cutlass)"
