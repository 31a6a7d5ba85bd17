# Two commands do everything (and `make gpu` on a GPU machine):
#   make run    set up, then fuse a random ResNet-50, check parity, time eager vs fused (GPU if there is one)
#   make test   set up, then run the test suite (GPU tests are skipped without a GPU; the `slow`
#               architectures are left out: `python -m pytest -m slow` runs them)
PYTHON ?= python3
# torch is installed only when missing, so a machine with its own CUDA build of torch keeps it.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BUILD_DEPS = setuptools wheel ninja pybind11 nvidia-cutlass==4.2.0.0
TEST_DEPS = pytest pytest-benchmark hypothesis onnx onnxruntime onnxscript timm openvino ruff
# predict's optional packages (setup.py's extras "predict" and "ray"): tests/test_scale.py runs Ray Data
# and Ray Serve for real, so the tests install them.
SCALE_DEPS = ray[data,serve] tqdm pyarrow

.PHONY: setup setup-test run test gpu gpu-full gpu-tests

PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore
# Succeeds when all the requirements named are installed; pip runs only when one is not.
INSTALLED = $(PYTHON) fused_resnet/_build/missing_requirements.py

# fused_resnet/_build/setup_stamp.py runs `pip install -e .` (which compiles the CUDA extension where there is
# an nvcc and a GPU, or FUSED_RESNET_BUILD_CUDA=1) only when the sources, torch, the arch list, the toolchain
# or the GPU's presence changed since the last install; then ninja recompiles only what changed. It prints
# one line: what the extension is built for, or why it is not.
setup:
	@$(INSTALLED) torch torchvision || $(PIP_INSTALL) $(TORCH_PINS)
	@$(INSTALLED) $(BUILD_DEPS) || $(PIP_INSTALL) $(BUILD_DEPS)
	@MAX_JOBS=$${MAX_JOBS:-2} $(PYTHON) fused_resnet/_build/setup_stamp.py

setup-test: setup
	@$(INSTALLED) $(TEST_DEPS) || $(PIP_INSTALL) $(TEST_DEPS)
	@$(INSTALLED) $(SCALE_DEPS) || $(PIP_INSTALL) $(SCALE_DEPS)

run: setup
	$(PYTHON) -m fused_resnet

test: setup-test
	$(PYTHON) -m pytest -ra -m "not slow"

# On a machine with an NVIDIA GPU: build, run the GPU test group, then the benchmarks, which write
# their results under benchmarks/results/. `gpu` takes the quick set (target: under 10 minutes on an H100);
# `gpu-full` every architecture and the whole benchmark grid. Each test file runs in its own
# process, so that a kernel fault (which poisons the CUDA context) costs one file's results, not all;
# the benchmarks run either way, and the target fails at the end if any test did.
GPU_TEST_FILES = $(wildcard tests/test_*.py)

gpu: setup-test
	@$(MAKE) --no-print-directory gpu-tests GPU_MARKS="gpu and not slow"; tests=$$?; \
	$(PYTHON) benchmarks/per_layer.py && $(PYTHON) benchmarks/end_to_end.py --quick && exit $$tests

gpu-full: setup-test
	@$(MAKE) --no-print-directory gpu-tests GPU_MARKS="gpu"; tests=$$?; \
	$(PYTHON) benchmarks/per_layer.py && $(PYTHON) benchmarks/end_to_end.py && exit $$tests

# pytest exits 5 when a file has no test with these marks: not a failure.
gpu-tests:
	@$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'the GPU tests need a CUDA GPU: torch.cuda.is_available() is False')"
	@failed=""; for file in $(GPU_TEST_FILES); do \
	  $(PYTHON) -m pytest -m "$(GPU_MARKS)" -ra $$file; status=$$?; \
	  if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then failed="$$failed $$file"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "GPU tests failed in:$$failed"; exit 1; fi; echo "GPU tests passed"
