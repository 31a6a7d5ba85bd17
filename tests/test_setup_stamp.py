"""The set-up's decisions: rebuild (fused_resnet/_build/setup_stamp.py) only when a source, torch, the arch list or
the installed extension changed; run pip for requirements (fused_resnet/_build/missing_requirements.py) only when
one is missing."""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "fused_resnet" / "_build" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_stamp = _tool("setup_stamp")
missing_requirements = _tool("missing_requirements")

SUMMARY = "CUDA extension: built for sm_80, sm_90a, CUTLASS 4.2.0; CPU extension: built (NCHW <-> channels_last copies, BatchNorm fold, 16-bit ReLU)"
EXTENSIONS = ["fused_resnet/_C.so", "fused_resnet/_cpu.so"]


@pytest.fixture
def tree(tmp_path):
    """A source tree with what the build reads: csrc/, setup.py, pyproject.toml."""
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "ops.cpp").write_text("// registration\n")
    (tmp_path / "csrc" / "cuda" / "conv.cu").write_text("// kernel\n")
    (tmp_path / "csrc" / "cuda" / "conv.cuh").write_text("// header\n")
    (tmp_path / "setup.py").write_text("# build\n")
    (tmp_path / "pyproject.toml").write_text("[build-system]\n")
    (tmp_path / "fused_resnet").mkdir()
    return tmp_path


ENVIRON = {"PATH": "", "TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}


@pytest.fixture(autouse=True)
def gpu(monkeypatch):
    """Whether torch sees a GPU, as the stamp records it: set here instead of asked of a child process."""
    answer = ["no"]
    monkeypatch.setattr(setup_stamp, "gpu_present", lambda: answer[0])
    return answer


def _stamp(tree, environ=ENVIRON):
    return {"inputs": setup_stamp.build_inputs(tree, environ), "summary": SUMMARY, "extensions": EXTENSIONS}


def test_nothing_changed_reuses_the_build(tree):
    stamp = _stamp(tree)
    assert setup_stamp.reason_to_rebuild(stamp, setup_stamp.build_inputs(tree, ENVIRON), EXTENSIONS, True) is None


@pytest.mark.parametrize("path", ["csrc/cuda/conv.cu", "csrc/cuda/conv.cuh", "csrc/ops.cpp", "setup.py", "pyproject.toml"])
def test_a_changed_source_rebuilds(tree, path):
    stamp = _stamp(tree)
    (tree / path).write_text("// edited\n")
    reason = setup_stamp.reason_to_rebuild(stamp, setup_stamp.build_inputs(tree, ENVIRON), EXTENSIONS, True)
    assert reason == f"{path} changed"


def test_an_added_or_removed_source_rebuilds(tree):
    stamp = _stamp(tree)
    (tree / "csrc" / "cuda" / "add_relu.cu").write_text("// new kernel\n")
    (tree / "csrc" / "ops.cpp").unlink()
    reason = setup_stamp.reason_to_rebuild(stamp, setup_stamp.build_inputs(tree, ENVIRON), EXTENSIONS, True)
    assert reason == "csrc/cuda/add_relu.cu added; csrc/ops.cpp removed"


def test_a_changed_arch_list_rebuilds(tree):
    stamp = _stamp(tree)
    inputs = setup_stamp.build_inputs(tree, {**ENVIRON, "TORCH_CUDA_ARCH_LIST": "8.6"})
    assert setup_stamp.reason_to_rebuild(stamp, inputs, EXTENSIONS, True) == "TORCH_CUDA_ARCH_LIST 8.0;9.0a -> 8.6"


def test_a_gpu_that_appears_or_build_cuda_rebuilds(tree, gpu, monkeypatch):
    """Without a GPU setup.py skips the extension, so a GPU that appears (or FUSED_RESNET_BUILD_CUDA=1)
    must rebuild; without an nvcc there is nothing to build either way, and torch is not asked."""
    monkeypatch.setattr(setup_stamp, "_nvcc", lambda environ: "/usr/local/cuda/bin/nvcc")
    stamp = _stamp(tree)
    gpu[0] = "yes"
    assert setup_stamp.reason_to_rebuild(stamp, setup_stamp.build_inputs(tree, ENVIRON), EXTENSIONS, True) == "gpu no -> yes"
    inputs = setup_stamp.build_inputs(tree, {**ENVIRON, "FUSED_RESNET_BUILD_CUDA": "1"})
    assert setup_stamp.reason_to_rebuild(stamp, inputs, EXTENSIONS, True) == "FUSED_RESNET_BUILD_CUDA (unset) -> 1; gpu no -> not asked"
    monkeypatch.setattr(setup_stamp, "_nvcc", lambda environ: "(none)")
    monkeypatch.setattr(setup_stamp, "gpu_present", lambda: pytest.fail("torch was asked about a GPU without an nvcc"))
    assert setup_stamp.build_inputs(tree, ENVIRON)["environment"]["gpu"] == "not asked"


def test_a_changed_torch_version_rebuilds(tree):
    stamp = _stamp(tree)
    inputs = setup_stamp.build_inputs(tree, ENVIRON)
    assert inputs["environment"]["torch"] == setup_stamp._version("torch") != "not installed"
    stamp["inputs"]["environment"]["torch"] = "2.13.0+cu128"
    reason = setup_stamp.reason_to_rebuild(stamp, inputs, EXTENSIONS, True)
    assert reason == f"torch 2.13.0+cu128 -> {inputs['environment']['torch']}"


def test_no_stamp_a_missing_extension_or_another_install_rebuilds(tree):
    inputs = setup_stamp.build_inputs(tree, ENVIRON)
    assert setup_stamp.reason_to_rebuild(None, inputs, EXTENSIONS, True) == "no earlier build in this tree"
    assert setup_stamp.reason_to_rebuild(_stamp(tree), inputs, [], True) == "fused_resnet/_C.so is missing"
    assert setup_stamp.reason_to_rebuild(_stamp(tree), inputs, EXTENSIONS[:1], True) == "fused_resnet/_cpu.so is missing"
    assert "not installed from this tree" in setup_stamp.reason_to_rebuild(_stamp(tree), inputs, EXTENSIONS, False)
    # A build that had no CUDA extension to make (no nvcc) is not missing one.
    assert setup_stamp.reason_to_rebuild({**_stamp(tree), "extensions": EXTENSIONS[1:]}, inputs, EXTENSIONS[1:], True) is None
    # A stamp from before the list was kept rebuilds (and the new one keeps it).
    old = {key: value for key, value in _stamp(tree).items() if key != "extensions"}
    assert setup_stamp.reason_to_rebuild(old, inputs, EXTENSIONS, True) == "the stamp does not list the extensions built"


def test_ensure_installed_builds_once_then_reuses(tree, monkeypatch, capsys):
    """The whole flow, with pip replaced by a fake build: the second run decides in the stamp's favour."""
    monkeypatch.setattr(setup_stamp, "_installed_from", lambda root: True)
    suffix = setup_stamp.sysconfig.get_config_var("EXT_SUFFIX")
    extensions = [tree / "fused_resnet" / (name + suffix) for name in ("_C", "_cpu")]
    builds = []

    def fake_install(root, log):
        builds.append(root)
        log.write_text("running build_ext\n" + "".join(f"  {line}\n" for line in SUMMARY.split("; ")))
        for extension in extensions:
            extension.write_bytes(b"\x7fELF")
        return 0

    assert setup_stamp.ensure_installed(tree, fake_install) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(SUMMARY + " (")
    assert json.loads((tree / setup_stamp.STAMP).read_text())["extensions"] == [e.relative_to(tree).as_posix() for e in extensions]
    assert setup_stamp.ensure_installed(tree, fake_install) == 0
    assert capsys.readouterr().out == f"{SUMMARY} (reused: nothing it is built from changed)\n"
    assert len(builds) == 1

    (tree / "csrc" / "cuda" / "conv.cu").write_text("// edited\n")
    assert setup_stamp.ensure_installed(tree, fake_install) == 0
    assert "(csrc/cuda/conv.cu changed)" in capsys.readouterr().out
    assert len(builds) == 2

    extensions[1].unlink()  # the CPU extension alone removed
    assert setup_stamp.ensure_installed(tree, fake_install) == 0
    assert f"(fused_resnet/_cpu{suffix} is missing)" in capsys.readouterr().out
    assert len(builds) == 3


def test_a_failed_build_leaves_no_extension_and_no_stamp(tree, monkeypatch, capsys):
    monkeypatch.setattr(setup_stamp, "_installed_from", lambda root: True)
    stale = tree / "fused_resnet" / ("_C" + setup_stamp.sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"\x7fELF")

    def failing_install(root, log):
        log.write_text("error: nvcc failed\n")
        return 1

    assert setup_stamp.ensure_installed(tree, failing_install) == 1
    assert not stale.exists() and not (tree / setup_stamp.STAMP).exists()
    err = capsys.readouterr().err
    assert "error: nvcc failed" in err and "pip install failed (exit code 1)" in err


def test_missing_requirements_are_the_absent_ones_and_other_versions():
    installed = importlib.metadata.version("pytest")
    assert missing_requirements.missing(["pytest", f"pytest=={installed}"]) == []
    absent = ["pytest==0.0.1", "no-such-distribution-anywhere"]
    assert missing_requirements.missing(absent) == absent


def test_a_requirement_with_extras_is_checked_by_its_name():
    installed = importlib.metadata.version("pytest")
    assert missing_requirements.missing(["pytest[testing]", f"pytest[testing]=={installed}"]) == []
    assert missing_requirements.missing(["no-such-distribution-anywhere[extra]"]) == ["no-such-distribution-anywhere[extra]"]
