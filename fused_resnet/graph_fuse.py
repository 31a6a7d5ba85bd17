"""The graph pass: conv -> BN (-> add) (-> ReLU) chains anywhere in a model become one FusedConv2d.

The model is traced with torch.fx (where a module cannot be traced, its children are, recursively).
Each conv node is matched against PATTERNS, longest first; a step only consumes the single user of
the node before it, so an intermediate value used anywhere else is never fused away. What no pattern
matches (squeeze-excitation and ECA gating, pooling, heads, activations other than ReLU) stays as it is.

A pre-activation ResNet (v2) adds conv -> (BN ->) add -> BN + ReLU: the add's value y is the residual
stream (it may have other users, the next shortcut), and the BatchNorm + ReLU that opens the next block
(or the model's final norm) reads it. The chain becomes one FusedConv2dPreact whose two outputs are
y and z = that BN + ReLU of y; the add and the BN may sit in different blocks' forwards.

A match is applied in one of two ways, both computing the traced function exactly:
- a chain of modules alone (conv, BN, ReLU): the conv module becomes the FusedConv2d and the BN and
  ReLU modules become nn.Identity, in place, so the model keeps its classes, methods and forward;
- a chain with a residual add, which lives in some module's forward code: that module (a block,
  usually) is replaced by a torch.fx.GraphModule of its forward in which the chain is one call. A
  pre-activation chain whose add and BN lie in two blocks is rewritten in their closest common
  ancestor (a stage, the stages' Sequential). Where that is the model itself and the BN reads a child's
  output directly (the final norm after the stages), the child is rewritten with the BN appended to
  its forward and the BN module becomes nn.Identity, so the model keeps its class.
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
from .nn import FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedConv2dPreact, FusedResNet

# Chains that become one FusedConv2d, tried longest first. "bn_relu" is a BatchNorm that applies ReLU
# itself (timm's BatchNormAct2d); "bn_act" one that applies another activation, which is kept.
# "preact_..." is a BatchNorm (+ ReLU) that reads the add's value, which may have other users: the
# chain computes both (FusedConv2dPreact).
PATTERNS = (
    ("conv", "bn", "add", "preact_bn", "relu"),
    ("conv", "add", "preact_bn", "relu"),
    ("conv", "bn", "add", "preact_bn_relu"),
    ("conv", "add", "preact_bn_relu"),
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
        super().__init__(autowrap_functions=(conv_add_residual, conv_add_preact))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualified_name)


def conv_add_preact(conv: FusedConv2dPreact, x: torch.Tensor, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """What a fused conv (-> BN) -> add -> BN + ReLU chain computes, as (y, z); a residual the epilogue
    cannot take is added as the model wrote it (see conv_add_residual)."""
    if isinstance(residual, torch.Tensor) and residual.dtype == conv.weight.dtype and residual.shape == conv.output_shape(x):
        return conv(x, residual)
    y = conv.conv(x) + residual
    return y, conv.pre_activate(y)


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
    preact: fx.Node | None = None  # the BatchNorm that reads the add's value, in a pre-activation chain

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
        if kind.startswith("preact_"):  # one of the add's users, which may have others
            wanted = kind.removeprefix("preact_")
            step = next((u for u in previous.users if _kind(u, modules, modules_only) == wanted and u.args[0] is previous), None)
            if step is None or _features(modules[step.target]) != modules[conv.target].out_channels:
                return None
            match.preact = step
            match.nodes.append(step)
            continue
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
    if match.preact is not None:
        return FusedConv2dPreact.from_conv_bn(conv, bn, preact_bn=modules[match.preact.target], backend=backend, dtype=dtype)
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


def _group(match: _Match, prefix: str, names: dict[str, str] | None = None) -> FusionGroup:
    """The group of a match; `names` gives the model's path of a module known by another name here."""
    pattern = "+".join(match.pattern)
    if match.preact is not None:
        name = (names or {}).get(match.preact.target, prefix + match.preact.target)
        pattern += f" (the add's value and {name} of it, two outputs)"
    return FusionGroup(prefix + match.conv.target, pattern, True)


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
    if _kind(source, modules, modules_only=False) == "add":
        return "it follows an add that no conv (-> BN) -> add chain computes, so no conv can write it as a second output"
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


def _rewrite(module: nn.Module, backend, dtype, prefix: str, groups, report_rest: bool, tail=None) -> tuple[fx.GraphModule, bool]:
    """`module`'s forward as a GraphModule in which every match (adds included) is one FusedConv2d call.

    `tail`: (path, BatchNorm), the pre-activation BN its caller applies to its output; it is appended to
    the forward and fused there if a chain takes it. Returns the GraphModule and whether the tail was
    taken (then the caller must stop applying it)."""
    graph = _trace(module)
    gm = fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
    names, tail_node = {}, None
    output = next(n for n in graph.nodes if n.op == "output")
    if tail is not None and isinstance(output.args[0], fx.Node):  # (not a tuple or dict returned)
        tail_path, tail_bn = tail
        local = _free_name(gm, "preact_" + tail_path.replace(".", "_"))
        gm.add_submodule(local, tail_bn)
        names[local] = tail_path
        with graph.inserting_before(output):
            tail_node = graph.call_module(local, (output.args[0],))
        output.args = (tail_node,)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    matches = _matches(graph, modules, PATTERNS, modules_only=False)
    tail_taken = any(m.preact is tail_node for m in matches if tail_node is not None)
    if tail_node is not None and not tail_taken:  # no chain took it: the caller keeps applying it
        output.args = (tail_node.args[0],)
        graph.erase_node(tail_node)
    for match in matches:
        # A conv (BN) called from one place is replaced where it is, keeping its name in the state_dict.
        conv_name, bn_name = match.conv.target, match.bn.target if match.bn is not None else None
        name = conv_name if calls[conv_name] == 1 else _free_name(gm, conv_name)
        gm.add_submodule(name, _fused_conv(match, modules, backend, dtype))
        if match.preact is not None:
            # Where the add was: y's other users may come before the BatchNorm.
            with graph.inserting_before(match.add):
                both = graph.call_function(conv_add_preact, (graph.get_attr(name), match.conv.args[0], match.residual))
                y, z = (graph.call_function(operator.getitem, (both, i)) for i in (0, 1))
            match.add.replace_all_uses_with(y)
            match.last.replace_all_uses_with(z)
            for node in reversed(match.nodes):
                graph.erase_node(node)
            groups.append(_group(match, prefix, names))
            continue
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
    return gm, tail_taken


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


def _caller(node: fx.Node) -> str:
    """The path of the module whose forward holds this node ("" is the root)."""
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:  # a module call lists the module itself
        stack = stack[:-1]
    return stack[-1] if stack else ""


def _common_ancestor(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _owners_of_residual_chains(graph: fx.Graph, modules, in_tree: Counter) -> dict[str, str | None]:
    """The modules whose forward holds the add of a conv -> (BN ->) add chain ("" is the root), each with
    the tail its rewrite takes (see _rewrite), or None.

    A pre-activation chain's owner holds both its add and its BN: their closest common ancestor. When
    that is the module whose forward calls the BN, which reads the value a child returns and nothing
    else reads, the owner is that child, with the BN as its tail: the ancestor itself is left as it is.
    """
    owners: dict[str, str | None] = {}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for match in _matches(graph, modules, PATTERNS, modules_only=False):
        if match.add is None:
            continue
        owner, tail, inside = _caller(match.add), None, match.nodes
        if match.preact is not None:
            bn_caller = _caller(match.preact)
            owner = _common_ancestor(owner, bn_caller)
            bn = match.preact.target
            if (
                owner == bn_caller
                and match.pattern[-1] == "preact_bn_relu"
                and len(match.add.users) == 1
                and calls[bn] == 1
                and in_tree[id(modules[bn])] == 1
            ):
                child = _caller(match.add)[len(owner) + 1 if owner else 0 :].split(".")[0]
                owner, tail, inside = f"{owner}.{child}" if owner else child, bn, match.nodes[:-1]
        if all(n.op != "call_module" or not owner or n.target.startswith(owner + ".") for n in inside):
            if tail is not None:
                owners[owner] = tail
            else:
                owners.setdefault(owner, None)
    return {o: tail for o, tail in owners.items() if not any(o.startswith(other + ".") for other in owners if other)}


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
    owners = _owners_of_residual_chains(graph, dict(module.named_modules()), in_tree)
    if "" in owners:
        return _rewrite(module, backend, dtype, prefix, groups, report_rest=True)[0]
    for owner, tail in sorted(owners.items()):
        tail_bn = None if tail is None else (prefix + tail, module.get_submodule(tail))
        fused_owner, tail_taken = _rewrite(module.get_submodule(owner), backend, dtype, f"{prefix}{owner}.", groups, False, tail_bn)
        module.set_submodule(owner, fused_owner)
        if tail_taken:
            module.set_submodule(tail, nn.Identity())
    _substitute(module, backend, dtype, prefix, groups, in_tree)
    return module
