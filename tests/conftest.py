import contextlib
import os

import torch

# Triton kernels run on CPU tensors through its interpreter when there is no GPU. The variable is
# read when triton is imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A named backend that does not serve a case raises instead of handing it to the reference, here and
# in the processes the tests start: a test that names a backend tests that backend.
os.environ.setdefault("FUSED_RESNET_STRICT", "1")

import pytest  # noqa: E402

from fused_resnet import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run the GPU suite with: pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fallback_allowed(monkeypatch):
    """For the tests of the fallback itself: a named backend may hand a case to the reference, and
    each reason warns again (once per test)."""
    monkeypatch.setattr(dispatch, "STRICT", False)
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Outputs start as NaN (dispatch.POISON_OUTPUTS), so an element a kernel forgets to write shows."""
    monkeypatch.setattr(dispatch, "POISON_OUTPUTS", True)


@pytest.fixture
def served_by():
    """`with served_by("triton"): ...` fails unless backend "triton" computed every fused op called
    in the block, and at least one was called: a test that names a backend proves that it ran."""

    @contextlib.contextmanager
    def check(name: str):
        with dispatch.record_serving() as served:
            yield served
        assert served, f"no fused op was computed in the block (expected backend {name!r})"
        assert set(served) == {name}, f"expected backend {name!r} to compute every op, got {served}"

    return check


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


class CurrentCUDADevice:
    """A stand-in for torch.cuda.device on a machine without a GPU: records which device is current."""

    def __init__(self):
        self.current = torch.device("cuda", 0)

    @contextlib.contextmanager
    def __call__(self, device):
        previous, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def current_cuda_device(monkeypatch):
    """torch.cuda.device replaced by a recorder whose `current` says which CUDA device is current."""
    recorder = CurrentCUDADevice()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    return recorder
