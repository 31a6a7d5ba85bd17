"""Exporting a fused model: torch.export with a dynamic batch, and ONNX made of standard operators only.

A fused model's graph holds our ops, fused_resnet::conv2d_bias_act and fused_resnet::add_relu, which
pick a backend in Python on every call. export_program lowers them to one of three forms (`lower_to`):

    "fused"   kept as they are: the program runs on our kernels, in a Python process that imported
              fused_resnet (an AOTInductor package calls back into Python for them).
    "aten"    the aten ops they compute (convolution with the folded weights and bias, add, relu):
              the program runs wherever PyTorch runs, and AOTInductor compiles all of it its own way.
    "triton"  our Triton kernels as fused_resnet_triton ops (fused_resnet/triton_ops.py): on CUDA,
              AOTInductor compiles the kernels themselves into its package, which then runs them
              without fused_resnet.
    "cuda"    the CUDA C++ backend's ops, fused_resnet_C::conv2d_bias_act / add_relu, where its
              kernels serve the layer (aten ops elsewhere): the program, and an AOTInductor package
              made from it, runs wherever the compiled library fused_resnet/_C*.so is loaded, from
              Python or C++, without fused_resnet's Python code.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers the ops named below)

# ONNX's Conv (opset 20, what torch.onnx writes) takes no bfloat16.
ONNX_DTYPES = (torch.float32, torch.float16, torch.float64)


def _conv2d_bias_act_aten(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    y = torch.ops.aten.convolution.default(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    if residual is not None:
        y = torch.ops.aten.add.Tensor(y, residual)
    return torch.ops.aten.relu.default(y) if relu else y


def _add_relu_aten(x, y, backend):
    return torch.ops.aten.relu.default(torch.ops.aten.add.Tensor(x, y))


def _preact_aten(y, scale, shift):
    return torch.ops.aten.relu.default(torch.ops.aten.addcmul.default(shift[:, None, None], y, scale[:, None, None]))


def _conv2d_preact_aten(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend):
    y = _conv2d_bias_act_aten(x, weight, bias, residual, stride, padding, dilation, groups, False, backend)
    return y, _preact_aten(y, scale, shift)


# For ExportedProgram.run_decompositions: our ops as the aten ops they compute. `backend` only says
# where an op runs, never what it computes, so the decompositions ignore it.
DECOMPOSITIONS = {
    torch.ops.fused_resnet.conv2d_bias_act.default: _conv2d_bias_act_aten,
    torch.ops.fused_resnet.add_relu.default: _add_relu_aten,
    torch.ops.fused_resnet.conv2d_preact.default: _conv2d_preact_aten,
}


def _conv2d_bias_act_triton(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    return torch.ops.fused_resnet_triton.conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)


def _add_relu_triton(x, y, backend):
    return torch.ops.fused_resnet_triton.add_relu(x, y)


def _conv2d_preact_triton(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend):
    return torch.ops.fused_resnet_triton.conv2d_preact(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups)


# Our ops as the Triton ops that carry their kernels into AOTInductor, whatever backend each used.
TRITON_DECOMPOSITIONS = {
    torch.ops.fused_resnet.conv2d_bias_act.default: _conv2d_bias_act_triton,
    torch.ops.fused_resnet.add_relu.default: _add_relu_triton,
    torch.ops.fused_resnet.conv2d_preact.default: _conv2d_preact_triton,
}


def _conv2d_bias_act_cuda(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    from .backends import cuda

    if cuda.kernel_unsupported_reason(x, weight) is not None:
        return _conv2d_bias_act_aten(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)
    # config -1: the extension's size heuristic picks the kernel each time the program runs.
    return torch.ops.fused_resnet_C.conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, relu, -1)


def _add_relu_cuda(x, y, backend):
    return torch.ops.fused_resnet_C.add_relu(x, y)


def _conv2d_preact_cuda(x, weight, bias, residual, scale, shift, stride, padding, dilation, groups, backend):
    # The lowering does not use the kernels' second output (conv2d_preact_out) yet: y from the C++ conv
    # where it serves, z from aten ops.
    y = _conv2d_bias_act_cuda(x, weight, bias, residual, stride, padding, dilation, groups, False, backend)
    return y, _preact_aten(y, scale, shift)


# Our ops as the CUDA C++ extension's ops, wherever its conv kernels serve the layer.
CUDA_DECOMPOSITIONS = {
    torch.ops.fused_resnet.conv2d_bias_act.default: _conv2d_bias_act_cuda,
    torch.ops.fused_resnet.add_relu.default: _add_relu_cuda,
    torch.ops.fused_resnet.conv2d_preact.default: _conv2d_preact_cuda,
}

# What export_program's `lower_to` names: the decompositions to run (None: keep our ops).
LOWERINGS = {"fused": None, "aten": DECOMPOSITIONS, "triton": TRITON_DECOMPOSITIONS, "cuda": CUDA_DECOMPOSITIONS}


def _lowering_table(lower_to: str, args: tuple) -> dict | None:
    if lower_to not in LOWERINGS:
        raise ValueError(f"lower_to must be one of {', '.join(map(repr, LOWERINGS))}, got {lower_to!r}")
    if lower_to in ("triton", "cuda"):  # the ops run on our kernels: the inputs' device must suit them
        from . import backends

        for device in {a.device for a in args if isinstance(a, Tensor)}:
            reason = backends.get(lower_to).unavailable_reason(device)
            if reason is not None:
                raise ValueError(f"lower_to={lower_to!r} cannot serve the {device.type} inputs: {reason}")
    if lower_to == "triton":
        from . import triton_ops  # noqa: F401  (registers the fused_resnet_triton ops)
    return LOWERINGS[lower_to]


def _as_tuple(args) -> tuple:
    return args if isinstance(args, tuple) else (args,)


def export_program(
    model: nn.Module, args, *, dynamic_batch: bool = True, lower_to: str = "fused"
) -> torch.export.ExportedProgram:
    """torch.export.export of `model` called on `args` (a tensor or a tuple of positional arguments).

    dynamic_batch: dim 0 of every tensor argument is one dynamic dimension, "batch", so the program
        takes any batch size. The example batch must then be at least 2: torch.export turns a size
        of 0 or 1 seen while tracing into a constant.
    lower_to: what our ops become in the program: "fused" (kept), "aten" (DECOMPOSITIONS: the
        program loads and runs without fused_resnet), "triton" (TRITON_DECOMPOSITIONS: loading the
        program needs fused_resnet, but an AOTInductor package compiled from it does not) or "cuda"
        (CUDA_DECOMPOSITIONS: runs where fused_resnet/_C*.so is loaded). See the module docstring.
    """
    args = _as_tuple(args)
    table = _lowering_table(lower_to, args)
    dynamic_shapes = None
    if dynamic_batch:
        batches = [a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0]
        if batches and min(batches) < 2:
            raise ValueError(
                f"dynamic_batch=True needs example inputs with a batch of at least 2, got {min(batches)}: "
                "torch.export would specialise the program to that batch size"
            )
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)
    exported = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    return exported if table is None else exported.run_decompositions(table)


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """torch.export.save, without the "No complete tensor found in the group!" warning it gives for
    every weight that is not contiguous (a fused model's are channels_last): for a weight that shares
    its storage with no other tensor it then saves that weight as it is, strides included."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, path)


def export_onnx(model: nn.Module, args, path: str | os.PathLike, *, dynamic_batch: bool = True) -> str:
    """Writes `model`, called on `args`, to `path` as one self-contained ONNX file; returns `path`.

    The file holds standard ONNX operators only (Conv with the folded weights and bias, Add, Relu,
    MaxPool, ReduceMean, Gemm...), so any ONNX runtime runs it. With `dynamic_batch` its inputs and
    outputs have a symbolic first dimension named "batch" (the example batch must be at least 2).
    float32, float16 and float64 models export; bfloat16 ones do not (ONNX Conv has no bfloat16).
    """
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    unsupported = sorted(str(d) for d in dtypes if d not in ONNX_DTYPES)
    if unsupported:
        raise TypeError(f"the model holds {', '.join(unsupported)} tensors; ONNX Conv takes float32, float16, float64")
    exported = export_program(model, args, dynamic_batch=dynamic_batch, lower_to="aten")
    program = torch.onnx.export(exported, _as_tuple(args), dynamo=True, verbose=False)
    if dynamic_batch:
        inputs = program.model.graph.inputs
        program.rename_axes({value.shape[0]: "batch" for value in inputs if not isinstance(value.shape[0], int)})
    program.save(path, external_data=False)
    return path
