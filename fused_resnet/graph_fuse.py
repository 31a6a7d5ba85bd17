"""The graph pass: conv -> BN (-> add) (-> ReLU) chains anywhere in a model become one FusedConv2d.

The model is traced with torch.fx (where a module cannot be traced, its children are, recursively).
Each conv node is matched against PATTERNS, longest first; a step only consumes the single user of
the node before it, so an intermediate value used anywhere else is never fused away. What no pattern
matches (squeeze-excitation and ECA gating, pooling, heads, activations other than ReLU) stays as it is.

A match is applied in one of two ways, both computing the traced function exactly:
- a chain of modules alone (conv, BN, ReLU): the conv module becomes the FusedConv2d and the BN and
  ReLU modules become nn.Identity, in place, so the model keeps its classes, methods and forward;
- a chain with a residual add, which lives in some module's forward code: that module (a block,
  usually) is replaced by a torch.fx.GraphModule of its forward in which the chain is one call.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fold import BN_TYPES
from .known_modules import bn_activation, bn_problem, conv_problem, is_relu
from .nn import FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedResNet

# Chains that become one FusedConv2d, tried longest first. "bn_relu" is a BatchNorm that applies ReLU
# itself (timm's BatchNormAct2d); "bn_act" one that applies another activation, which is kept.
PATTERNS = (
    ("conv", "bn", "add", "relu"),
    ("conv", "bn", "relu"),
    ("conv", "bn_relu"),
    ("conv", "bn_act"),
    ("conv", "bn", "add"),
    ("conv", "bn"),
    ("conv", "add", "relu"),
    ("conv", "add"),
    ("conv", "relu"),
)
_MODULE_PATTERNS = tuple(p for p in PATTERNS if "add" not in p)  # what module substitution can apply
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, torch.add)
_LEAVES = (*BN_TYPES, FusedConv2d, FusedBasicBlock, FusedBottleneck, FusedResNet)


@dataclass
class FusionGroup:
    """One conv + BN (+ add) (+ ReLU) group of a model, fused or not."""

    name: str  # the conv's path in the model (the BatchNorm's, for a BN that follows no conv)
    pattern: str  # what the group holds, e.g. "conv+bn+add+relu"
    fused: bool
    reason: str = ""  # why it was left unfused


def conv_add_residual(conv: FusedConv2d, x: torch.Tensor, residual) -> torch.Tensor:
    """What a fused conv -> BN -> add (-> ReLU) chain computes: the residual is added in the conv's
    epilogue when it is a tensor of the output's shape and dtype (every ResNet), and as the model's own
    add wrote it otherwise (a broadcast, another dtype, a number), so the fused graph keeps its function."""
    if isinstance(residual, torch.Tensor) and residual.dtype == conv.weight.dtype and residual.shape == conv.output_shape(x):
        return conv(x, residual)
    y = conv(x, relu=False) + residual
    return y.relu() if conv.relu else y


class _Tracer(fx.Tracer):
    """Stops at BatchNorms (so each is one node, whatever its class), at our fused modules, and at the
    residual chains a previous pass made (conv_add_residual), which a parent's trace must keep whole."""

    def __init__(self):
        super().__init__(autowrap_functions=(conv_add_residual,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualified_name)


def _trace(module: nn.Module) -> fx.Graph:
    return _Tracer().trace(module)


def _kind(node: fx.Node, modules: dict[str, nn.Module], modules_only: bool) -> str | None:
    """What a node is, in the words of PATTERNS (or "identity"); None for anything else."""
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


@dataclass
class _Match:
    nodes: list[fx.Node]  # every node the chain replaces, in order, identities included
    pattern: tuple[str, ...]
    conv: fx.Node
    bn: fx.Node | None
    add: fx.Node | None

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def residual(self) -> fx.Node | None:
        """The add's other operand, read from the graph as it is now: a chain applied earlier may have
        replaced the node that computed it."""
        return None if self.add is None else next(a for a in self.add.args if a not in self.nodes)


def _features(bn: nn.Module) -> int:
    return bn.running_mean.numel()  # FrozenBatchNorm2d has no num_features


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(conv: fx.Node, pattern, modules, modules_only: bool) -> _Match | None:
    """The chain `pattern` starting at `conv`, or None. Identity modules between steps are skipped."""
    match = _Match([conv], pattern, conv, None, None)
    for kind in pattern[1:]:
        previous = match.last
        step = _single_user(previous)
        while step is not None and _kind(step, modules, modules_only) == "identity":
            match.nodes.append(step)
            previous, step = step, _single_user(step)
        if step is None or _kind(step, modules, modules_only) != kind or step.args[0] is not previous and kind != "add":
            return None
        if kind == "add":
            others = [a for a in step.args if a is not previous]
            if len(others) != 1:  # x + x: both operands are the chain's value
                return None
            match.add = step
        if kind.startswith("bn"):
            if _features(modules[step.target]) != modules[conv.target].out_channels:
                return None
            match.bn = step
        match.nodes.append(step)
    return match


def _first_match(conv: fx.Node, modules, patterns, modules_only: bool) -> _Match | None:
    return next((m for p in patterns if (m := _match(conv, p, modules, modules_only)) is not None), None)


def _fused_conv(match: _Match, modules, backend: str, dtype) -> FusedConv2d:
    conv = modules[match.conv.target]
    bn = modules[match.bn.target] if match.bn is not None else None
    relu = "relu" in match.pattern or "bn_relu" in match.pattern
    return FusedConv2d.from_conv_bn(conv, bn, relu=relu, backend=backend, dtype=dtype)


def _matches(graph: fx.Graph, modules, patterns, modules_only: bool) -> list[_Match]:
    """Non-overlapping matches, in graph order."""
    found, taken = [], set()
    for node in graph.nodes:
        if node in taken or _kind(node, modules, modules_only) != "conv" or len(node.args) != 1:
            continue
        match = _first_match(node, modules, patterns, modules_only)
        if match is not None and not taken.intersection(match.nodes):
            found.append(match)
            taken.update(match.nodes)
    return found


def _group(match: _Match, prefix: str) -> FusionGroup:
    return FusionGroup(prefix + match.conv.target, "+".join(k for k in match.pattern), True)


def _unfused_reason(bn_node: fx.Node, modules) -> str:
    """Why a BatchNorm node is still in the graph after fusing."""
    problem = bn_problem(modules[bn_node.target])
    if problem is not None:
        return problem
    source = bn_node.args[0] if bn_node.args else None
    if not isinstance(source, fx.Node):
        return "its input is not a traced value"
    module = modules.get(source.target) if source.op == "call_module" else None
    if isinstance(module, nn.Conv2d):
        if conv_problem(module) is not None:
            return f"the conv before it: {conv_problem(module)}"
        if len(source.users) > 1:
            return f"the conv's output is used {len(source.users)} times, not by the BatchNorm alone"
        if module.out_channels != _features(modules[bn_node.target]):
            return f"the conv has {module.out_channels} output channels, the BatchNorm {_features(modules[bn_node.target])}"
        return "the conv before it is shared with other call sites that differ"
    if isinstance(module, FusedConv2d):
        return f"it follows {source.target}, a conv already fused with its residual add or BatchNorm"
    what = type(module).__name__ if module is not None else f"{source.op} {getattr(source.target, '__name__', source.target)}"
    return f"it follows {what}, not a conv: no conv to fold it into"


def _report_unfused(graph: fx.Graph, modules, prefix: str, groups: list[FusionGroup]) -> None:
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], BN_TYPES):
            groups.append(FusionGroup(prefix + node.target, "bn", False, _unfused_reason(node, modules)))


def _free_name(root: nn.Module, wanted: str) -> str:
    names = dict(root.named_modules())
    name, i = wanted, 1
    while name in names:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _rewrite(module: nn.Module, backend, dtype, prefix: str, groups, report_rest: bool) -> fx.GraphModule:
    """`module`'s forward as a GraphModule in which every match (adds included) is one FusedConv2d call."""
    graph = _trace(module)
    gm = fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for match in _matches(graph, modules, PATTERNS, modules_only=False):
        # A conv (BN) called from one place is replaced where it is, keeping its name in the state_dict.
        conv_name, bn_name = match.conv.target, match.bn.target if match.bn is not None else None
        name = conv_name if calls[conv_name] == 1 else _free_name(gm, conv_name)
        gm.add_submodule(name, _fused_conv(match, modules, backend, dtype))
        with graph.inserting_before(match.last):
            if match.residual is None:
                out = graph.call_module(name, (match.conv.args[0],))
            else:
                out = graph.call_function(conv_add_residual, (graph.get_attr(name), match.conv.args[0], match.residual))
            if "bn_act" in match.pattern:
                act_name = bn_name if calls[bn_name] == 1 else _free_name(gm, bn_name + "_act")
                gm.add_submodule(act_name, copy.deepcopy(bn_activation(modules[bn_name])))
                out = graph.call_module(act_name, (out,))
        match.last.replace_all_uses_with(out)
        for node in reversed(match.nodes):
            graph.erase_node(node)
        groups.append(_group(match, prefix))
    if report_rest:
        _report_unfused(graph, dict(gm.named_modules()), prefix, groups)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _substitute(root: nn.Module, backend, dtype, prefix: str, groups, in_tree: Counter) -> None:
    """Folds conv -> BN (-> ReLU) module chains in place: the conv module becomes the FusedConv2d, the BN
    and ReLU modules nn.Identity. Valid when every call of each of these modules is in such a chain.

    A ReLU module shared by several chains (torchvision blocks call one self.relu three times) fails that
    test; the second round folds the conv -> BN part of those chains and leaves the ReLU module called.
    """
    for patterns in (_MODULE_PATTERNS, (("conv", "bn"),)):
        graph = _trace(root)
        modules = dict(root.named_modules())
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        by_chain = defaultdict(list)
        for match in _matches(graph, modules, patterns, modules_only=True):
            by_chain[tuple(n.target for n in match.nodes if _kind(n, modules, True) != "identity")].append(match)
        for chain, matches in by_chain.items():
            if any(calls[t] != len(matches) or in_tree[id(modules[t])] != 1 for t in chain):
                continue
            match = matches[0]
            root.set_submodule(chain[0], _fused_conv(match, modules, backend, dtype))
            for target in chain[1:]:
                act = bn_activation(modules[target]) if "bn_act" in match.pattern and target == match.bn.target else None
                root.set_submodule(target, copy.deepcopy(act) if act is not None else nn.Identity())
            groups.extend(_group(m, prefix) for m in matches)
    _report_unfused(_trace(root), dict(root.named_modules()), prefix, groups)


def _owners_of_residual_chains(graph: fx.Graph, modules) -> set[str]:
    """The modules whose forward holds the add of a conv -> (BN ->) add chain ("" is the root)."""
    owners = set()
    for match in _matches(graph, modules, PATTERNS, modules_only=False):
        if match.add is None:
            continue
        stack = [path for path, _ in match.add.meta.get("nn_module_stack", {}).values()]
        owner = stack[-1] if stack else ""
        if all(n.op != "call_module" or not owner or n.target.startswith(owner + ".") for n in match.nodes):
            owners.add(owner)
    return {o for o in owners if not any(o.startswith(other + ".") for other in owners)}


def fuse_graph(module: nn.Module, backend: str, dtype, groups: list[FusionGroup], prefix: str = "", in_tree=None) -> nn.Module:
    """Fuses every match in `module` (changed in place; it must be the caller's copy) and returns the result,
    which is `module` itself unless its own forward holds a residual chain (then a GraphModule).

    `groups` receives a FusionGroup per fused chain and per BatchNorm left unfused, named from `prefix`.
    """
    if in_tree is None:  # how often each module occurs in the whole tree: a shared module is never replaced
        in_tree = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    if isinstance(module, _LEAVES):
        if isinstance(module, BN_TYPES):
            reason = "its parent's forward cannot be traced" if prefix else "a BatchNorm alone: no conv to fold it into"
            groups.append(FusionGroup(prefix.rstrip("."), "bn", False, reason))
        return module
    try:
        graph = _trace(module)
    except Exception:  # torch.fx cannot trace this forward (data-dependent control flow...): go one level down
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, fuse_graph(child, backend, dtype, groups, f"{prefix}{name}.", in_tree))
        return module
    owners = _owners_of_residual_chains(graph, dict(module.named_modules()))
    if "" in owners:
        return _rewrite(module, backend, dtype, prefix, groups, report_rest=True)
    for owner in sorted(owners):
        fused_owner = _rewrite(module.get_submodule(owner), backend, dtype, f"{prefix}{owner}.", groups, False)
        module.set_submodule(owner, fused_owner)
    _substitute(module, backend, dtype, prefix, groups, in_tree)
    return module
