"""torch.compile, torch.export (dynamic batch, save / load), AOTInductor, ONNX, pickling and `convert`.

Tiny models (resnet18 at 32x32) keep the CPU tests fast; the GPU tests run the same paths on CUDA.
"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet as fr
from fused_resnet import backends
from fused_resnet.__main__ import main
from fused_resnet.architectures import build
from fused_resnet.export import export_program, save_program
from fused_resnet.parity import parity, randomize_bn_, relative_error

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return build("resnet18", torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fused(model):
    return fr.fuse(model)


def _images(batch, seed=1, device="cpu", dtype=torch.float32, size=SIZE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@torch.no_grad()
def assert_matches(out, fused, model, x):
    """`out` passes the parity rule against float64 eager, and differs from the fused model's output by
    no more than that rule allows."""
    dtype = fused(x).dtype
    check = parity(out, copy.deepcopy(model).to(dtype)(x.to(dtype)), copy.deepcopy(model).double()(x.double()))
    assert check.ok, check
    assert relative_error(out, fused(x)) <= check.bound


def _targets(program):
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


# How a fresh Python loads each kind of artifact into a callable.
LOADERS = {"aoti": "torch._inductor.aoti_load_package({path!r})", "export": "torch.export.load({path!r}).module()"}


def run_without_fused_resnet(package, inputs: dict, tmp_path, libraries=(), kind="aoti") -> dict:
    """Runs an AOTInductor package (or, kind="export", a torch.export program) on each input in a
    fresh Python that never imports fused_resnet (it may load compiled `libraries`, as a C++ program
    would); returns the outputs by the same keys."""
    torch.save(inputs, tmp_path / "x.pt")
    script = f"""
        import sys, torch
        for library in {list(map(str, libraries))!r}:
            torch.ops.load_library(library)
        runner = {LOADERS[kind].format(path=str(package))}
        inputs = torch.load({str(tmp_path / "x.pt")!r})
        torch.save({{key: runner(x) for key, x in inputs.items()}}, {str(tmp_path / "y.pt")!r})
        assert "fused_resnet" not in sys.modules
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / "y.pt")


def test_compile_fullgraph_matches_eager_fused(model, fused):
    compiled = torch.compile(fused, fullgraph=True)  # fullgraph: a graph break is an error
    x = _images(2)
    with torch.no_grad():
        assert_matches(compiled(x), fused, model, x)


# save_program keeps torch.export.save's warning about our channels_last weights out; it must not escape.
@pytest.mark.filterwarnings("error:No complete tensor found")
@pytest.mark.parametrize("lower_to", ["fused", "aten"])
def test_export_dynamic_batch_save_and_load(model, fused, lower_to, tmp_path):
    program = export_program(fused, _images(2), lower_to=lower_to)
    targets = _targets(program)
    assert ("fused_resnet.conv2d_bias_act.default" in targets) == (lower_to == "fused")
    assert ("aten.convolution.default" in targets) == (lower_to == "aten")
    save_program(program, tmp_path / "model.pt2")
    loaded_program = torch.export.load(tmp_path / "model.pt2")
    for name, weight in program.state_dict.items():
        saved = loaded_program.state_dict[name]
        assert saved.stride() == weight.stride() and torch.equal(saved, weight), name
    loaded = loaded_program.module()
    for batch in (0, 1, 3):
        x = _images(batch, seed=batch)
        with torch.no_grad():
            assert_matches(loaded(x), fused, model, x)


def test_add_relu_decomposes_and_every_tensor_input_gets_the_batch_dimension():
    class AddRelu(nn.Module):
        def forward(self, x, y):
            return fr.ops.add_relu(x, y)

    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    program = export_program(AddRelu(), (x, y), lower_to="aten")
    assert _targets(program) == {"aten.add.Tensor", "aten.relu.default"}
    x, y = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(program.module()(x, y), torch.relu(x + y), rtol=0, atol=0)


def test_unknown_lowering_is_refused(fused):
    with pytest.raises(ValueError, match="lower_to must be one of 'fused', 'aten', 'triton', 'cuda', got 'onnx'"):
        export_program(fused, _images(2), lower_to="onnx")


def test_lowering_to_triton_needs_a_device_triton_runs_on(fused, monkeypatch):
    monkeypatch.setattr(backends.get("triton"), "unavailable_reason", lambda device: "Triton runs on CUDA tensors")
    with pytest.raises(ValueError, match="lower_to='triton' cannot serve the cpu inputs: Triton runs on CUDA"):
        export_program(fused, _images(2), lower_to="triton")


def test_lowering_to_cuda_needs_cuda_inputs(fused):
    with pytest.raises(ValueError, match="lower_to='cuda' cannot serve the cpu inputs: "):
        export_program(fused, _images(2), lower_to="cuda")


def _skip_without_triton(device):
    if reason := backends.get("triton").unavailable_reason(torch.device(device)):
        pytest.skip(reason)


def test_resnet_lowers_to_triton_kernels_only(fused):
    _skip_without_triton("cpu")
    targets = _targets(export_program(fused, _images(2), lower_to="triton"))
    assert "fused_resnet_triton.conv2d_bias_act.default" in targets
    assert not {t for t in targets if t.startswith("fused_resnet.")}


def _narrow_blocks():
    """Two residual blocks with few channels (one downsampling): every kind of fused conv of a
    ResNet, small enough for Triton's interpreter."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    blocks = nn.Sequential(
        torchvision.models.resnet.BasicBlock(8, 16, stride=2, downsample=downsample),
        torchvision.models.resnet.Bottleneck(16, 4),
    )
    return randomize_bn_(blocks.eval(), torch.Generator().manual_seed(0))


def test_export_lowered_to_triton_kernels(poisoned_outputs, monkeypatch, tmp_path):
    """lower_to="triton": the fused ops become Triton ops (which AOTInductor compiles into its
    package on CUDA); the program saves, loads and matches at other batch sizes. On the CPU the
    kernels run in Triton's interpreter; outputs are poisoned before the kernels write them."""
    _skip_without_triton("cpu")
    model = _narrow_blocks()
    fused = fr.fuse(model)
    images = lambda batch: torch.randn(batch, 8, 9, 7, generator=torch.Generator().manual_seed(batch))  # noqa: E731
    program = export_program(fused, images(2), lower_to="triton")
    # (clone: each fused block returns its output in eager's memory format, NCHW here, as the model does)
    assert _targets(program) - {"aten.clone.default"} == {"fused_resnet_triton.conv2d_bias_act.default"}
    save_program(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (1, 3):
        x = images(batch)
        with torch.no_grad():
            assert_matches(loaded(x), fused, model, x)


def test_add_relu_lowered_to_triton(poisoned_outputs, monkeypatch):
    _skip_without_triton("cpu")

    class AddRelu(nn.Module):
        def forward(self, x, y):
            return fr.ops.add_relu(x, y)

    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    program = export_program(AddRelu(), (x, y), lower_to="triton")
    assert _targets(program) == {"fused_resnet_triton.add_relu.default"}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x, y = (torch.randn(5, 4, 3, 3).contiguous(memory_format=memory_format) for _ in range(2))
        torch.testing.assert_close(program.module()(x, y), torch.relu(x + y), rtol=0, atol=0)


def test_export_needs_an_example_batch_of_two(fused):
    with pytest.raises(ValueError, match="batch of at least 2, got 1"):
        export_program(fused, _images(1))
    export_program(fused, _images(1), dynamic_batch=False)


def test_aoti_package_runs_without_fused_resnet(model, fused, tmp_path):
    """The decomposed program, compiled by AOTInductor, runs in a Python that never imports fused_resnet."""
    package = torch._inductor.aoti_compile_and_package(
        export_program(fused, _images(2), lower_to="aten"), package_path=str(tmp_path / "model.pt2")
    )
    x = _images(3)
    assert_matches(run_without_fused_resnet(package, {3: x}, tmp_path)[3], fused, model, x)


def test_whole_module_pickle_round_trips(fused, tmp_path):
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
    assert type(loaded) is type(fused)
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


def test_onnx_has_standard_operators_only_and_matches_in_onnxruntime(model, fused, tmp_path):
    """The operators the README lists, exactly. At 64x64 the last stage's maps are 2x2, so the pooled
    features must be flattened from more than one pixel."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = fr.export_onnx(fused, _images(2, size=64), tmp_path / "model.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert {node.op_type for node in proto.graph.node} == {"Conv", "Add", "Relu", "MaxPool", "ReduceMean", "Reshape", "Gemm"}
    assert all(len(node.input) == 3 for node in proto.graph.node if node.op_type == "Conv")  # folded bias
    assert [value.type.tensor_type.shape.dim[0].dim_param for value in proto.graph.input] == ["batch"]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = _images(batch, seed=batch, size=64)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert_matches(torch.from_numpy(out), fused, model, x)


def test_onnx_refuses_bfloat16(model, tmp_path):
    with pytest.raises(TypeError, match="bfloat16"):
        fr.export_onnx(fr.fuse(model, dtype=torch.bfloat16), _images(2), tmp_path / "model.onnx")


# --- python -m fused_resnet convert ---


def _convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "fused_resnet", "convert", "--arch", "resnet18", "--image-size", str(SIZE), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


# `convert` without --weights builds the model as the `model` fixture does (resnet18, seed 0): the
# artifact's numbers, computed in another process, are checked against it.


def test_convert_writes_a_program_that_loads_without_fused_resnet(model, fused, tmp_path):
    path = tmp_path / "model.pt2"
    result = _convert("--out", str(path))
    assert result.returncode == 0, result.stderr
    assert "random weights, BatchNorm statistics randomised" in result.stdout
    assert f"wrote {path}" in result.stdout and "matches the fused model" in result.stdout
    assert result.stderr == ""
    x = _images(4)
    assert_matches(run_without_fused_resnet(path, {4: x}, tmp_path, kind="export")[4], fused, model, x)


def test_convert_writes_an_aoti_package(model, fused, tmp_path, capsys):
    path = tmp_path / "model.pt2"
    assert main(["convert", "--arch", "resnet18", "--image-size", str(SIZE), "--aoti", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}: AOTInductor package of aten ops" in out
    assert "(torch._inductor.aoti_load_package)" in out and "matches the fused model" in out
    x = _images(3)
    assert_matches(run_without_fused_resnet(path, {3: x}, tmp_path)[3], fused, model, x)


def test_convert_torchvision_weights_to_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    weights = tmp_path / "resnet18.pt"
    trained = randomize_bn_(torchvision.models.resnet18(num_classes=10).eval(), torch.Generator().manual_seed(3))
    torch.save(trained.state_dict(), weights)
    path = tmp_path / "model.onnx"
    args = ["convert", "--arch", "resnet18", "--image-size", str(SIZE), "--weights", str(weights), "--out", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"weights from {weights} (10 classes)" in out
    assert f"wrote {path}: ONNX" in out and "(onnxruntime, CPUExecutionProvider)" in out and "matches" in out


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """name -> a file that is not resnet18 weights, and the message `convert` gives for it."""
    tmp_path = tmp_path_factory.mktemp("weights")
    state = torchvision.models.resnet18().state_dict()
    cases = {
        "missing": (tmp_path / "nothing.pt", "does not exist"),
        "not-torch-save": (tmp_path / "junk.pt", "not a torch.save file"),
        "directory": (tmp_path, "cannot read"),
        "whole-model": (tmp_path / "whole.pt", "a whole model saved with torch.save(model)?"),
        "checkpoint-dict": (tmp_path / "checkpoint.pt", "whose entries model, epoch are not tensors"),
        "other-arch": (tmp_path / "resnet34.pt", "does not hold resnet18 weights: unexpected keys (96): layer1.2."),
        "missing-keys": (tmp_path / "partial.pt", "missing keys (1): fc.bias"),
        "shape": (tmp_path / "shape.pt", "layer1.0.conv1.weight is (64, 64, 1, 1) here, (64, 64, 3, 3) in resnet18"),
    }
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save(torchvision.models.resnet18(), tmp_path / "whole.pt")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pt")
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, tmp_path / "partial.pt")
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, tmp_path / "shape.pt")
    return cases


@pytest.mark.parametrize(
    "case",
    ["missing", "not-torch-save", "directory", "whole-model", "checkpoint-dict", "other-arch", "missing-keys", "shape"],
)
def test_convert_explains_weights_that_do_not_fit(case, weights_files, tmp_path, capsys):
    path, message = weights_files[case]
    with pytest.raises(SystemExit) as exit:
        main(["convert", "--arch", "resnet18", "--weights", str(path), "--out", str(tmp_path / "model.pt2")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet9000", "--out", "{tmp}/m.pt2"], "argument --arch: unknown architecture 'resnet9000'"),
        (["--out", "{tmp}/model.tflite"], "unknown extension '.tflite'; use .pt2 (torch.export) or .onnx"),
        (["--out", "{tmp}/no/such/dir/model.pt2"], "is not a directory this process can write to"),
        (["--out", "{tmp}/model.onnx", "--dtype", "bfloat16"], "--dtype bfloat16 cannot be written to ONNX"),
        (["--out", "{tmp}/model.pt2", "--batch", "1"], "--batch must be at least 2"),
        ([], "the following arguments are required: --out"),
        (["--out", "{tmp}/model.onnx", "--lower-to", "triton"], "--lower-to and --aoti apply to .pt2 outputs"),
        (["--out", "{tmp}/model.onnx", "--aoti"], "--lower-to and --aoti apply to .pt2 outputs"),
        (["--out", "{tmp}/model.pt2", "--lower-to", "cuda"], "--lower-to cuda: lower_to='cuda' cannot serve the cpu"),
        (["--out", "{tmp}/model.pt2", "--lower-to", "onnx"], "invalid choice: 'onnx'"),
    ],
)
def test_convert_explains_bad_arguments(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["convert", *(a.format(tmp=tmp_path) for a in args)])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_convert_error_is_a_message_and_exit_code_2_from_the_shell(tmp_path):
    result = _convert("--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "model.pt2"))
    assert result.returncode == 2
    assert "error: weights file" in result.stderr and "Traceback" not in result.stderr


# --- CUDA ---


def _cuda_model_and_input(backend="auto"):
    model = build("resnet18", torch.Generator().manual_seed(0)).cuda()
    return model, fr.fuse(model, backend=backend, dtype=torch.float16), _images(8, device="cuda")


@pytest.mark.gpu
def test_compile_fullgraph_on_cuda():
    model, fused, x = _cuda_model_and_input()
    with torch.no_grad():
        assert_matches(torch.compile(fused, fullgraph=True)(x), fused, model, x)


@pytest.mark.gpu
def test_aoti_decomposed_on_cuda(tmp_path):
    model, fused, x = _cuda_model_and_input()
    program = export_program(fused, x, lower_to="aten")
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    )
    for batch in (1, 8, 13):
        x = _images(batch, seed=batch, device="cuda")
        assert_matches(runner(x), fused, model, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_aoti_package_holds_the_triton_kernels(dtype, tmp_path, monkeypatch):
    """Lowered to Triton ops, the program compiles into an AOTInductor package that holds our
    Triton kernels and runs them in a Python that never imports fused_resnet, at other batch sizes."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32: eager and ours in full fp32
    model = build("resnet18", torch.Generator().manual_seed(0)).cuda()
    fused = fr.fuse(model, backend="triton", dtype=dtype)
    program = export_program(fused, _images(2, device="cuda", dtype=dtype), lower_to="triton")
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    inputs = {batch: _images(batch, seed=batch, device="cuda", dtype=dtype) for batch in (1, 8, 13)}
    for batch, out in run_without_fused_resnet(package, inputs, tmp_path).items():
        assert_matches(out, fused, model, inputs[batch])


@pytest.mark.gpu
def test_aoti_package_calls_the_cuda_extension_without_python_package(tmp_path):
    """Lowered to the CUDA C++ ops, the package runs in a Python that loads only the compiled library
    fused_resnet/_C*.so (as a C++ program would), never fused_resnet's Python code."""
    if reason := backends.get("cuda").unavailable_reason(torch.device("cuda")):
        pytest.skip(reason)
    from fused_resnet import _C

    model = build("resnet18", torch.Generator().manual_seed(0)).cuda()
    fused = fr.fuse(model, backend="cuda", dtype=torch.float16)
    program = export_program(fused, _images(2, device="cuda", dtype=torch.float16), lower_to="cuda")
    assert "fused_resnet_C.conv2d_bias_act.default" in _targets(program)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    inputs = {batch: _images(batch, seed=batch, device="cuda", dtype=torch.float16) for batch in (1, 8, 13)}
    for batch, out in run_without_fused_resnet(package, inputs, tmp_path, libraries=[_C.__file__]).items():
        assert_matches(out, fused, model, inputs[batch])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_aoti_keeps_our_kernels(backend, tmp_path):
    """Exported with our ops kept, the package calls them back through the dispatcher, so it runs in
    a Python process that imported fused_resnet. (For the Triton kernels to be compiled into the
    package itself, export with lower_to="triton": test_aoti_package_holds_the_triton_kernels.)"""
    if reason := backends.get(backend).unavailable_reason(torch.device("cuda")):
        pytest.skip(reason)
    model, fused, x = _cuda_model_and_input(backend)
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(export_program(fused, x), package_path=str(tmp_path / "model.pt2"))
    )
    for batch in (2, 8):
        x = _images(batch, seed=batch, device="cuda")
        assert_matches(runner(x), fused, model, x)


@pytest.mark.gpu
@pytest.mark.parametrize("lower_to", ["triton", "cuda"])
def test_convert_lowered_aoti_package_on_cuda(lower_to, tmp_path, capsys):
    if reason := backends.get(lower_to).unavailable_reason(torch.device("cuda")):
        pytest.skip(reason)
    path = tmp_path / "model.pt2"
    args = ["convert", "--arch", "resnet18", "--image-size", str(SIZE), "--dtype", "float16", "--device", "cuda",
            "--lower-to", lower_to, "--aoti", "--out", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "AOTInductor package of " in out and "matches the fused model" in out
