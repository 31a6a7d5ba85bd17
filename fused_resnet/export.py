"""Exporting a fused model: torch.export with a dynamic batch, and ONNX made of standard operators only.

A fused model's graph holds our ops, fused_resnet::conv2d_bias_act and fused_resnet::add_relu. A
program that keeps them runs on our kernels, but only in a Python process that has imported
fused_resnet. One that must run without our Python code (torch.export.load in plain PyTorch, an
AOTInductor package loaded from C++, ONNX) has them decomposed into the aten ops they compute:
convolution with the folded weights and bias, add, relu.
"""

from __future__ import annotations

import os

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


# For ExportedProgram.run_decompositions: our ops as the aten ops they compute. `backend` only says
# where an op runs, never what it computes, so the decompositions ignore it.
DECOMPOSITIONS = {
    torch.ops.fused_resnet.conv2d_bias_act.default: _conv2d_bias_act_aten,
    torch.ops.fused_resnet.add_relu.default: _add_relu_aten,
}


def _as_tuple(args) -> tuple:
    return args if isinstance(args, tuple) else (args,)


def export_program(
    model: nn.Module, args, *, dynamic_batch: bool = True, decompose: bool = False
) -> torch.export.ExportedProgram:
    """torch.export.export of `model` called on `args` (a tensor or a tuple of positional arguments).

    dynamic_batch: dim 0 of every tensor argument is one dynamic dimension, "batch", so the program
        takes any batch size. The example batch must then be at least 2: torch.export turns a size
        of 0 or 1 seen while tracing into a constant.
    decompose: our ops are replaced by the aten ops they compute (DECOMPOSITIONS), so that the
        program loads and runs without fused_resnet, and AOTInductor compiles all of it.
    """
    args = _as_tuple(args)
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
    return exported.run_decompositions(DECOMPOSITIONS) if decompose else exported


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
    exported = export_program(model, args, dynamic_batch=dynamic_batch, decompose=True)
    program = torch.onnx.export(exported, _as_tuple(args), dynamo=True, verbose=False)
    if dynamic_batch:
        inputs = program.model.graph.inputs
        program.rename_axes({value.shape[0]: "batch" for value in inputs if not isinstance(value.shape[0], int)})
    program.save(path, external_data=False)
    return path
