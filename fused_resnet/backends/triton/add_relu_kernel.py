"""relu(x + y) as one elementwise Triton kernel over the flat storage of x, y and out.

Flattening is valid only when the three tensors lay out their elements in one order, i.e. they are
dense in one memory format; anything else goes to the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreting, on_device_of


@triton.jit
def _add_relu_kernel(x_ptr, y_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # Sum in fp32 and round once, as eager PyTorch does for half types.
    total = tl.load(x_ptr + offs, mask=mask).to(tl.float32) + tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    total = tl.where(total < 0.0, 0.0, total)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def _shared_memory_format(*tensors: torch.Tensor) -> torch.memory_format | None:
    formats = [torch.contiguous_format]
    if tensors[0].dim() == 4:
        formats.append(torch.channels_last)
    for memory_format in formats:
        if all(t.is_contiguous(memory_format=memory_format) for t in tensors):
            return memory_format
    return None


def unsupported_reason(x, y) -> str | None:
    if x.dtype == torch.float64:
        return "float64 is computed by the reference backend"
    if _shared_memory_format(x, y) is None:
        return "x and y are not dense in one memory format (contiguous or channels_last)"
    return None


def add_relu(out, x, y, *, traceable=False) -> None:
    """traceable: launch through torch.library.wrap_triton (see fused_resnet/triton_ops.py)."""
    if _shared_memory_format(out, x, y) is None:
        raise ValueError("add_relu: out must be dense in the memory format of x and y")
    numel = out.numel()
    # The interpreter runs each program in Python: few large blocks are much faster there.
    block = min(triton.next_power_of_2(numel), 1 << 16) if interpreting() else 1024
    kernel = torch.library.wrap_triton(_add_relu_kernel) if traceable else _add_relu_kernel
    with on_device_of(out):
        kernel[(triton.cdiv(numel, block),)](x, y, out, numel, BLOCK=block, num_warps=4)
