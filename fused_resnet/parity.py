"""The numerical parity rule (docs/design.md), shared by the tests and the command line.

A result in a low precision passes when its error against a float64 reference is at most twice the
error of eager PyTorch in the same dtype on the same input, plus a floor relative to max|ref|.
Errors are max|out - ref| / max|ref|. NaN never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fold import BN_TYPES

FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max|out - ref| / max|ref| in float64; inf when either holds a NaN or an Inf (never a pass)."""
    out, ref = out.detach().to(torch.float64), ref.detach().to(device=out.device, dtype=torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    scale = ref.abs().max().item()
    error = (out - ref).abs().max().item()
    return error / scale if scale > 0 else error


@dataclass
class Parity:
    dtype: torch.dtype
    error: float  # ours against float64
    eager_error: float  # eager PyTorch in the same dtype against float64
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for NaN and inf

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{str(self.dtype).removeprefix('torch.')}: error {self.error:.3e}, eager {self.eager_error:.3e}, "
            f"bound {self.bound:.3e} -> {verdict}"
        )


def parity(out: Tensor, eager: Tensor, ref: Tensor) -> Parity:
    """Applies the rule to our output `out`, eager PyTorch's `eager` (same dtype, same input) and `ref`."""
    eager_error = relative_error(eager, ref)
    return Parity(out.dtype, relative_error(out, ref), eager_error, 2 * eager_error + FLOORS[out.dtype])


def top1_agreement(logits: Tensor, reference_logits: Tensor) -> float:
    """Fraction of rows whose argmax matches the reference's."""
    return (logits.argmax(-1).cpu() == reference_logits.argmax(-1).cpu()).double().mean().item()


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Gives every BatchNorm random statistics and affine parameters, in place.

    torchvision initialises BN as the identity (mean 0, var 1, gamma 1, beta 0), which would let a
    wrong fold pass unnoticed; parity tests randomise first.
    """

    def uniform(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64).mul(high - low).add(low))

    for module in model.modules():
        if isinstance(module, BN_TYPES):
            if module.running_mean is not None:  # None: a BatchNorm that keeps no running statistics
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.25, 2.0)
            if getattr(module, "weight", None) is not None:
                uniform(module.weight, 0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                uniform(module.bias, -0.5, 0.5)
    return model


