# Two commands do everything (and `make gpu` on a GPU machine):
#   make run    set up, then fuse a random ResNet-50, check parity, time eager vs fused (GPU if there is one)
#   make test   set up, then run the test suite (GPU tests are skipped without a GPU)
PYTHON ?= python3
# torch is installed only when missing, so a machine with its own CUDA build of torch keeps it.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BUILD_DEPS = setuptools wheel ninja pybind11 nvidia-cutlass==4.2.0.0
TEST_DEPS = pytest pytest-benchmark hypothesis onnx onnxruntime onnxscript

.PHONY: setup setup-test run test gpu gpu-full

setup:
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PINS)
	$(PYTHON) -m pip install $(BUILD_DEPS)
	MAX_JOBS=$${MAX_JOBS:-2} $(PYTHON) -m pip install --no-build-isolation -e .

setup-test: setup
	$(PYTHON) -m pip install $(TEST_DEPS)

run: setup
	$(PYTHON) -m fused_resnet

test: setup-test
	$(PYTHON) -m pytest -ra

# On a machine with an NVIDIA GPU: build, run the GPU test group, then the benchmarks, which write
# their results under benchmarks/results/. `gpu` takes the quick set (about 10 minutes on an H100);
# `gpu-full` every architecture and the whole benchmark grid.
gpu: setup-test
	$(PYTHON) -m pytest -m "gpu and not slow" -ra
	$(PYTHON) benchmarks/per_layer.py
	$(PYTHON) benchmarks/end_to_end.py --quick

gpu-full: setup-test
	$(PYTHON) -m pytest -m gpu -ra
	$(PYTHON) benchmarks/per_layer.py
	$(PYTHON) benchmarks/end_to_end.py
