"""Builds fused_resnet, its CPU C++ extension fused_resnet._cpu (csrc/cpu/: the NCHW <-> channels_last
copies, the BatchNorm fold, ReLU on 16-bit floats), and its CUDA C++ extension fused_resnet._C when a CUDA toolkit is found.

    pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0a"). Hopper's tensor-core
instructions (wgmma) and TMA need arch-specific sm_90a machine code: a "9.0" in the list is built as
"9.0a" (a cubin for the same devices), and the Hopper conv kernels are built whenever 9.0a is in it.
Without nvcc the pure-Python package is installed, and backend="cuda" explains that the extension
was not built. Without a GPU (torch.cuda.is_available() is False) it is not built either, since
nothing here could run it, unless FUSED_RESNET_BUILD_CUDA=1 (CI sets it: the build and its machine
code are tested without a GPU). Either way one line starting "CUDA extension: " says what is built, or why nothing is,
and one starting "CPU extension: " the same of the CPU one (fused_resnet/_build/setup_stamp.py, which `make` runs,
shows them). FUSED_RESNET_SKIP_CPU_BUILD=1 leaves the CPU extension out: the package then copies with ATen's ops.
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}


def _cutlass_include_dirs():
    """The CUTLASS headers shipped in the nvidia-cutlass package (cutlass_library/source/include and
    its tools/util/include, which CUTLASS 3.x conv kernels include), or None."""
    try:
        import cutlass_library
    except ImportError:
        return None
    source = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    include, util = os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")
    if not os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
        return None
    return [include, util] if os.path.isdir(util) else [include]


def _cutlass_version(include_dir: str) -> str:
    """The CUTLASS version of the headers, as cutlass/version.h states it."""
    with open(os.path.join(include_dir, "cutlass", "version.h")) as header:
        text = header.read()
    return ".".join(re.search(rf"#define CUTLASS_{part}\s+(\d+)", text).group(1) for part in ("MAJOR", "MINOR", "PATCH"))


def _sm_names(arch_list: str) -> str:
    """"8.0;9.0a" as "sm_80, sm_90a"."""
    return ", ".join("sm_" + arch.replace(".", "") for arch in arch_list.split(";"))


def _arch_list_with_sm90a(arch_list: str) -> str:
    """The arch list with a plain "9.0" turned into "9.0a": the same devices run either cubin, and
    only sm_90a code may use wgmma and TMA. ("9.0+PTX" stays: its PTX must run on later GPUs.)"""
    return ";".join("9.0a" if arch == "9.0" else arch for arch in arch_list.replace(" ", ";").split(";") if arch)


def _has_cuda_headers(home):
    return os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


# torch guesses CUDA_HOME as the parent of the directory holding the nvcc on the PATH. When that
# nvcc is a wrapper outside the toolkit (e.g. /usr/local/bin/nvcc) the guess has no CUDA headers;
# then use the standard toolkit location instead.
_nvcc = shutil.which("nvcc")
if (
    "CUDA_HOME" not in os.environ
    and "CUDA_PATH" not in os.environ
    and _nvcc is not None
    and not _has_cuda_headers(os.path.dirname(os.path.dirname(_nvcc)))
    and _has_cuda_headers("/usr/local/cuda")
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # torch must be installed first; the build needs its headers
    torch = None
    CUDA_HOME = None

if torch is None:
    not_built = "torch is not installed (the build needs its headers)"
elif os.environ.get("FUSED_RESNET_SKIP_CUDA_BUILD") == "1":
    not_built = "FUSED_RESNET_SKIP_CUDA_BUILD=1"
elif CUDA_HOME is None:
    not_built = "no nvcc found (no CUDA toolkit); backend='cuda' will say so"
elif os.environ.get("FUSED_RESNET_BUILD_CUDA") != "1" and not torch.cuda.is_available():
    not_built = "no GPU here (torch.cuda.is_available() is False); FUSED_RESNET_BUILD_CUDA=1 builds it anyway"
else:
    not_built = None

if torch is None:
    print("CPU extension: not built: torch is not installed (the build needs its headers)")
else:

    class _BuildInTree(BuildExtension):
        """Compiles into build/ext in the source tree instead of pip's temporary directory: ninja keeps
        its objects and their header dependencies there, and recompiles only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "ext")

    cmdclass["build_ext"] = _BuildInTree.with_options(use_ninja=True)
    if os.environ.get("FUSED_RESNET_SKIP_CPU_BUILD") == "1":
        print("CPU extension: not built: FUSED_RESNET_SKIP_CPU_BUILD=1")
    else:
        ext_modules.append(
            CppExtension(
                name="fused_resnet._cpu",
                sources=sorted(glob.glob("csrc/cpu/*.cpp")),
                # OpenMP for ATen's parallel_for (the library torch loaded serves it); no -march: the kernels
                # ask the CPU at run time, so that one build runs on any x86-64 CPU.
                extra_compile_args=["-O3", "-std=c++20", "-fopenmp"],
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        )
        print("CPU extension: built (NCHW <-> channels_last copies, BatchNorm fold, 16-bit ReLU)")

if not_built is None:
    arch_list = _arch_list_with_sm90a(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a"))
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    include_dirs = []
    defines = ["-DNDEBUG"]
    cutlass_includes = _cutlass_include_dirs()
    if cutlass_includes is None:
        sources = [s for s in sources if not os.path.basename(s).startswith("conv2d_")]
        built = "without the conv kernels: no CUTLASS headers (pip install nvidia-cutlass)"
    else:
        built = f"CUTLASS {_cutlass_version(cutlass_includes[0])}"
        include_dirs.extend(cutlass_includes)
        defines.append("-DFUSED_RESNET_WITH_CUTLASS")
        if "9.0a" in arch_list.split(";") and len(cutlass_includes) == 2:
            defines.append("-DFUSED_RESNET_WITH_SM90")
    ext_modules.append(
        CUDAExtension(
            name="fused_resnet._C",
            sources=sources,
            depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)),
            include_dirs=include_dirs,
            extra_compile_args={
                # The archs it has machine code for, so that it can refuse a GPU it has none for
                # (csrc/cuda_archs.cpp); commas, as a ';' would end the compiler's command line.
                "cxx": ["-O3", "-std=c++20", *defines, "-DFUSED_RESNET_CUDA_ARCHS=" + arch_list.replace(";", ",")],
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", *defines],
            },
            py_limited_api=False,
        )
    )
    print(f"CUDA extension: built for {_sm_names(arch_list)}, {built}")
else:
    print(f"CUDA extension: not built: {not_built}")

setup(
    name="fused_resnet",
    version="0.1.0",
    description="Fused conv + BatchNorm + ReLU (+ residual) kernels for ResNet inference in PyTorch",
    packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision"],
    extras_require={
        "triton": ["triton"],
        # The CPU inference engines the end-to-end benchmark measures against (skipped when missing).
        "cpu-peers": ["onnxruntime", "openvino"],
        # predict: its progress bar and Parquet output; ray: predict --ray (Ray Data) and serve (Ray Serve).
        "predict": ["tqdm", "pyarrow"],
        "ray": ["ray[data,serve]>=2.44", "tqdm", "pyarrow"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "onnx", "onnxruntime", "onnxscript", "timm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fused-resnet=fused_resnet.__main__:main"]},
)
