"""The fusion patterns: which chains of graph nodes become one fused module, as a table of rows.

A row is a Pattern: the steps of the chain, from the conv on, and the builder that makes the fused
module from the matched modules. The graph pass (graph_fuse.py) finds the rows in a traced graph,
longest first, and rewrites each match; adding a pattern is one row here (and a builder, for a new
kind of fused module). What a step matches is described once, in STEPS.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fold import BN_TYPES
from .known_modules import bn_activation, bn_problem, conv_problem, is_elementwise_activation, is_max_pool, is_relu
from .nn import FusedConv2d, FusedConv2dAct, FusedConv2dMaxPool, FusedConv2dPreact


@dataclass(frozen=True)
class Step:
    """One step of a chain after the conv.

    kind: what the node must be (node_kind's words: "bn", "bn_relu", "bn_act", "add", "relu", "maxpool", "act").
    side_read: the step reads the previous value, which may have other readers (a pre-activation's
        BatchNorm reads the residual stream, which the next shortcut reads too); otherwise the step must
        be the previous value's only reader, so that no value anyone else reads is fused away.
    binary: the step takes a second operand from outside the chain (the residual), in either place.
    """

    kind: str
    side_read: bool = False
    binary: bool = False

    @property
    def name(self) -> str:
        return f"preact_{self.kind}" if self.side_read else self.kind


STEPS = {
    "bn": Step("bn"),  # a BatchNorm, folded into the conv
    "bn_relu": Step("bn_relu"),  # a BatchNorm that applies ReLU itself (timm's BatchNormAct2d)
    "bn_act": Step("bn_act"),  # a BatchNorm that applies another activation, kept after the fused conv
    "add": Step("add", binary=True),  # the residual add, in the conv's epilogue
    "relu": Step("relu"),
    "maxpool": Step("maxpool"),  # a stem's max pooling, applied to the fused conv's channels_last output
    "act": Step("act"),  # an elementwise activation module other than ReLU, applied inside the fused conv
    "preact_bn": Step("bn", side_read=True),  # the next block's BatchNorm of the add's value: a second output
    "preact_bn_relu": Step("bn_relu", side_read=True),
}


@dataclass(frozen=True)
class Match:
    """The modules a matched chain holds, which a builder reads."""

    conv: nn.Conv2d
    bn: nn.Module | None  # folded into the conv
    preact_bn: nn.Module | None  # the BatchNorm of the second output
    relu: bool  # the chain ends in a ReLU (its own, or a BatchNormAct2d's)
    pool: nn.Module | None = None  # the nn.MaxPool2d the chain ends in
    act: nn.Module | None = None  # the activation (not ReLU) the chain ends in: a module, or a BatchNormAct2d's


@dataclass(frozen=True)
class Pattern:
    steps: tuple[str, ...]  # the names in STEPS after the conv
    build: Callable[[Match, str, torch.dtype | None], nn.Module]  # (match, backend, dtype) -> the fused module
    outputs: int = 1  # the values the fused module returns: 1, or (y, z) for a pre-activation chain

    @property
    def name(self) -> str:
        return "+".join(("conv", *self.steps))

    @property
    def has_add(self) -> bool:
        return "add" in self.steps


# The graph pass puts fused convs into code it does not own, which may read their outputs in any way
# (`.view`, returning them): they give the memory format eager's conv gives.


def fused_conv(match: Match, backend: str, dtype) -> FusedConv2d:
    return FusedConv2d.from_conv_bn(match.conv, match.bn, relu=match.relu, backend=backend, dtype=dtype, output_layout="as_eager")


def fused_conv_max_pool(match: Match, backend: str, dtype) -> FusedConv2dMaxPool:
    return FusedConv2dMaxPool.from_conv_bn_pool(
        match.conv, match.bn, match.pool, relu=match.relu, backend=backend, dtype=dtype, output_layout="as_eager"
    )


def fused_conv_act(match: Match, backend: str, dtype) -> FusedConv2dAct:
    return FusedConv2dAct.from_conv_bn_act(match.conv, match.bn, match.act, backend=backend, dtype=dtype, output_layout="as_eager")


def fused_preact_conv(match: Match, backend: str, dtype) -> FusedConv2dPreact:
    return FusedConv2dPreact.from_conv_bn(
        match.conv, match.bn, preact_bn=match.preact_bn, backend=backend, dtype=dtype, output_layout="as_eager"
    )


# Tried in this order at each conv: longer chains first.
PATTERNS = (
    Pattern(("bn", "add", "preact_bn", "relu"), fused_preact_conv, outputs=2),
    Pattern(("add", "preact_bn", "relu"), fused_preact_conv, outputs=2),
    Pattern(("bn", "add", "preact_bn_relu"), fused_preact_conv, outputs=2),
    Pattern(("add", "preact_bn_relu"), fused_preact_conv, outputs=2),
    Pattern(("bn", "add", "relu"), fused_conv),
    Pattern(("bn", "relu", "maxpool"), fused_conv_max_pool),
    Pattern(("bn_relu", "maxpool"), fused_conv_max_pool),
    Pattern(("bn", "relu"), fused_conv),
    Pattern(("bn_relu",), fused_conv),
    Pattern(("bn_act",), fused_conv_act),
    Pattern(("bn", "act"), fused_conv_act),
    Pattern(("bn", "add"), fused_conv),
    Pattern(("bn",), fused_conv),
    Pattern(("add", "relu"), fused_conv),
    Pattern(("relu",), fused_conv),
    # No row for a conv whose only fusion would be its residual add: that saves one pass over the output,
    # and the fused conv, computing in channels_last, converts its input, its residual and its output
    # where the modules around it are not fused (a GroupNorm ResNet-v2, timm's resnetv2_50d_gn, ran
    # 0.91x eager with its 16 such convs fused). It runs as it is.
)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, torch.add)


def node_kind(node: fx.Node, modules: dict[str, nn.Module], modules_only: bool) -> str | None:
    """What a node is: "conv", a Step kind, or "identity" (skipped inside a chain); None for anything else.
    `modules_only`: only module calls count (what module substitution can rewrite)."""
    if node.op == "call_module":
        module = modules[node.target]
        if len(node.args) != 1 or node.kwargs:
            return None
        if isinstance(module, nn.Conv2d):
            return "conv" if conv_problem(module) is None else None
        if isinstance(module, BN_TYPES):
            if bn_problem(module) is not None:
                return None
            act = bn_activation(module)
            return "bn" if act is None else "bn_relu" if is_relu(act) else "bn_act"
        if is_relu(module):
            return "relu"
        if is_max_pool(module):
            return "maxpool"
        if is_elementwise_activation(module):
            return "act"
        return "identity" if type(module) is nn.Identity else None
    if modules_only:
        return None
    is_call = node.op == "call_function"
    if (is_call and node.target in _RELU_FUNCTIONS or node.op == "call_method" and node.target in ("relu", "relu_")) and (
        len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    ):
        return "relu"
    if (is_call and node.target in _ADD_FUNCTIONS or node.op == "call_method" and node.target == "add") and (
        len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    ):
        return "add"
    return None
