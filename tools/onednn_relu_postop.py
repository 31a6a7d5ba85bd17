"""Does any oneDNN post-op that PyTorch's operators can attach to a convolution compute torch.relu?

    python tools/onednn_relu_postop.py
    ONEDNN_MAX_CPU_ISA=AVX2 python tools/onednn_relu_postop.py

The oneDNN backend applies ReLU as a separate in-place pass after each convolution. A post-op would
save that pass, but only if it returns torch.relu's values for every input: NaN stays NaN, +inf stays,
-inf and negatives become +0.0, and -0.0 stays -0.0. For each formulation (the unary attributes of
mkldnn._convolution_pointwise, alone and after the residual sum of its .binary overload) and a few
layer shapes, this runs the convolution with the post-op and without it, and compares the first with
torch.relu of the second bit for bit, per kind of pre-activation value. The implementation each shape
runs is the one oneDNN picks at this instruction-set level (ONEDNN_VERBOSE=1 names it).
"""

from __future__ import annotations

import math

import torch

from fused_resnet import cpu_isa

_conv = torch.ops.mkldnn._convolution_pointwise.default
_conv_add = torch.ops.mkldnn._convolution_pointwise.binary
_reorder = torch.ops.mkldnn._reorder_convolution_weight.default

SPECIALS = {"NaN": math.nan, "+inf": math.inf, "-inf": -math.inf, "-0.0": -0.0, "negative": -1.5, "positive": 2.5}
# (attribute, scalars): the unary post-ops that could stand for ReLU.
FORMULATIONS = [("relu", [None]), ("leaky_relu", [0.0]), ("hardtanh", [0.0, math.inf])]
# (input channels, output channels, kernel, stride): a stem, a 3x3, a 1x1 expansion, a 1x1 reduction.
SHAPES = [(3, 64, 7, 2), (64, 64, 3, 1), (64, 256, 1, 1), (256, 128, 1, 1)]


def _kind(value: torch.Tensor) -> str:
    v = value.item()
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if v == 0:
        return "-0.0" if math.copysign(1.0, v) < 0 else "+0.0"
    return "negative" if v < 0 else "positive"


def _input(channels: int, kernel: int, size: int = 24) -> torch.Tensor:
    """Negative values, and special values one kernel apart: no window holds two, so a zero tap
    times a NaN or an infinity elsewhere in it does not turn every output into NaN."""
    x = -torch.rand(1, channels, size, size) - 0.5
    specials = list(SPECIALS.values())
    for n, (i, j) in enumerate((i, j) for i in range(0, size, kernel) for j in range(0, size, kernel)):
        x[0, n % channels, i, j] = specials[n % len(specials)]
    return x.contiguous(memory_format=torch.channels_last)


def _identity_weight(cin: int, cout: int, k: int) -> torch.Tensor:
    w = torch.zeros(cout, cin, k, k)
    for o in range(cout):
        w[o, o % cin, k // 2, k // 2] = 1.0
    return w


def mismatches(attr: str, scalars: list, cin: int, cout: int, k: int, stride: int, residual: bool) -> dict[str, int]:
    """How many outputs of each kind of pre-activation value differ from torch.relu's, bit for bit."""
    x, p = _input(cin, k), k // 2
    args = ([p, p], [stride, stride], [1, 1], 1)
    weight = _reorder(_identity_weight(cin, cout, k), *args, list(x.shape))
    bias = None
    if residual:
        r = torch.zeros_like(_conv(x, weight, bias, *args, "none", [None], ""))
        pre = _conv_add(x, r, weight, bias, *args, "add", 1.0, None, [None], "")
        out = _conv_add(x, r, weight, bias, *args, "add", 1.0, attr, scalars, "")
    else:
        pre = _conv(x, weight, bias, *args, "none", [None], "")
        out = _conv(x, weight, bias, *args, attr, scalars, "")
    expected = torch.relu(pre)
    differ = (out.view(torch.int32) != expected.view(torch.int32)) & ~(out.isnan() & expected.isnan())
    counts: dict[str, int] = {}
    for value, bad in zip(pre.flatten(), differ.flatten()):
        kind = _kind(value)
        counts.setdefault(kind, 0)
        counts[kind] += int(bad)
    return counts


def main() -> None:
    print(f"oneDNN at {cpu_isa.describe()}; torch {torch.__version__}")
    for attr, scalars in FORMULATIONS:
        for residual in (False, True):
            for cin, cout, k, stride in SHAPES:
                name = f"{attr}{scalars if scalars != [None] else ''}{' after the sum' if residual else ''}"
                try:
                    counts = mismatches(attr, scalars, cin, cout, k, stride, residual)
                except RuntimeError as error:  # torch takes only some attributes after the sum
                    print(f"{name:34s} {cin}->{cout} {k}x{k}/{stride}: refused ({str(error).splitlines()[0]})")
                    continue
                wrong = ", ".join(f"{kind} ({n})" for kind, n in counts.items() if n) or "none"
                covered = " ".join(sorted(counts))
                print(f"{name:34s} {cin}->{cout} {k}x{k}/{stride}: differs from torch.relu on {wrong}; saw {covered}")


if __name__ == "__main__":
    main()
