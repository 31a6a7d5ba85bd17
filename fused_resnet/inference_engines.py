"""The inference engines a CPU user would pick instead of fused_resnet, run as their users run them:
ONNX Runtime and OpenVINO. Both are optional: a peer whose package is missing is skipped with the
command that installs it.

- "onnxruntime": the model exported with torch.onnx.export (the TorchScript exporter, opset 17), one
  session on the CPU execution provider with every graph optimisation on (ORT_ENABLE_ALL: on x86 it
  rewrites convolutions to its NCHWc MLAS kernels and fuses activations and sums), `threads` intra-op
  threads and one inter-op thread. float32 only: its CPU provider has no bfloat16 or float16 Conv.
- "openvino": ov.convert_model(model, example_input=x), compiled for "CPU" with a LATENCY hint,
  `threads` inference threads and the precision asked for as INFERENCE_PRECISION_HINT (f32, bf16,
  f16); one infer request, reused. A precision the CPU plugin does not run in raises, naming it.

Each engine compiles on its first call, from that batch (the benchmarks build a peer per batch size
and time that first call as its setup, like torch.compile's), takes the NCHW torch batch, and returns
the logits as a torch tensor.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from collections.abc import Callable

import torch
from torch import nn

from . import cpu_isa

PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_OPENVINO_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def unavailable_reason(engine: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why `engine` cannot run this peer on `device` in `dtype` (None: it can)."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"{engine} is measured on the CPU only"
    if importlib.util.find_spec(PACKAGES[engine]) is None:
        return f"{PACKAGES[engine]} is not installed (pip install {PACKAGES[engine]})"
    if engine == "onnxruntime" and dtype not in (None, torch.float32):
        return f"ONNX Runtime's CPU provider has no {str(dtype).removeprefix('torch.')} convolution"
    if engine == "openvino" and dtype is not None:
        import openvino

        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        wanted = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}.get(dtype)
        if wanted not in capabilities:
            return f"OpenVINO's CPU plugin does not compute {str(dtype).removeprefix('torch.')} on this CPU (it offers {', '.join(capabilities)})"
        # The plugin lists what the CPU has, but its own oneDNN obeys ONEDNN_MAX_CPU_ISA like torch's, and
        # fails to compile a precision the cap leaves out.
        cap = cpu_isa.cap_setting()
        if cap is not None and cpu_isa.onednn_computes(dtype) is False:
            variable, value = cap
            return f"OpenVINO's CPU plugin runs oneDNN, which {variable}={value} leaves without it: {cpu_isa.missing_reason(dtype)}"
    return None


def build(engine: str, model: nn.Module, dtype: torch.dtype, threads: int | None = None) -> Callable:
    """Peer `engine` for the eval-mode `model` (float32 weights), computing in `dtype` on `threads`
    threads (default: torch's)."""
    reason = unavailable_reason(engine, torch.device("cpu"), dtype)
    if reason is not None:
        raise RuntimeError(reason)
    model = copy.deepcopy(model).float().eval()
    threads = threads or torch.get_num_threads()
    compile_for = _onnxruntime if engine == "onnxruntime" else _openvino
    session: list[Callable] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()  # the engines take float32 NCHW, whatever they compute in
        if not session:
            session.append(compile_for(model, x, dtype, threads))
        return session[0](x)

    return run


def _onnxruntime(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, threads: int) -> Callable:
    session = onnxruntime_session(model, x, threads)
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def onnxruntime_session(model: nn.Module, x: torch.Tensor, threads: int, profile_prefix: str | None = None):
    """The ONNX Runtime session the "onnxruntime" peer runs (its input is named "x"). With
    `profile_prefix`, the session also records each node's time; `session.end_profiling()` writes
    them to a JSON file under that prefix and returns its path."""
    import onnxruntime

    exported = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), exported, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(exported.getvalue(), options, providers=["CPUExecutionProvider"])


def _openvino(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, threads: int) -> Callable:
    import openvino

    core = openvino.Core()
    with torch.no_grad():
        converted = openvino.convert_model(model, example_input=x)
    precision = _OPENVINO_PRECISIONS[dtype]
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(converted, "CPU", config)
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    if used != getattr(openvino.Type, precision):  # the plugin may settle on another precision than the hint asked for
        raise RuntimeError(f"OpenVINO's CPU plugin computes in {used} here, not the {precision} asked for")
    request = compiled.create_infer_request()

    def infer(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy()})
        # The output tensor is the request's own buffer, rewritten by its next call: the caller gets a copy.
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return infer
