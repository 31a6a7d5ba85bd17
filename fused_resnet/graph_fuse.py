"""The graph pass: conv -> BN (-> add) (-> ReLU) chains anywhere in a model become one FusedConv2d.

The model is traced with torch.fx (where a module cannot be traced, its children are, recursively).
Each conv node is matched against the rows of fused_resnet.patterns.PATTERNS, longest first; a step only consumes the single user of
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

import inspect
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import patterns
from .fold import BN_TYPES
from .layout import in_eager_layout
from .known_modules import bn_activation, bn_problem, conv_problem, hook_problem
from .nn import FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedConv2dPreact, FusedResNet
from .patterns import STEPS, Pattern, node_kind
from .safety import Refusals



def _module_patterns() -> tuple[Pattern, ...]:
    """The rows module substitution can apply: those without an add, which lives in forward code."""
    return tuple(p for p in patterns.PATTERNS if not p.has_add)
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
    y = conv(x, relu=False, may_stay_channels_last=False) + in_eager_layout(residual, conv._residual_note)
    return y.relu() if conv.relu else y


class _Tracer(fx.Tracer):
    """Stops at BatchNorms (so each is one node, whatever its class), at our fused modules, at modules
    with hooks (called as modules, so that their hooks fire; their insides are fused apart, in place),
    and at the residual chains a previous pass made (conv_add_residual), which a parent's trace must
    keep whole."""

    def __init__(self):
        super().__init__(autowrap_functions=(conv_add_residual, conv_add_preact))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or hook_problem(module) is not None or super().is_leaf_module(module, qualified_name)


class _Refused:
    """Stands, in a graph's table of modules, for a module that must stay as it is: it matches no step."""

    def __init__(self, module: nn.Module, reason: str):
        self.module, self.reason = module, reason


def _modules(root: nn.Module, refusals: Refusals) -> dict:
    """`root`'s modules by path, those that must stay as they are as _Refused."""
    table = {}
    for name, module in root.named_modules():
        reason = refusals.reason(module)
        table[name] = module if reason is None else _Refused(module, reason)
    return table


def _real(module):
    return module.module if isinstance(module, _Refused) else module


def conv_add_preact(conv: FusedConv2dPreact, x: torch.Tensor, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """What a fused conv (-> BN) -> add -> BN + ReLU chain computes, as (y, z); a residual the epilogue
    cannot take is added as the model wrote it (see conv_add_residual)."""
    if isinstance(residual, torch.Tensor) and residual.dtype == conv.weight.dtype and residual.shape == conv.output_shape(x):
        return conv(x, residual)
    y = conv.conv(x) + in_eager_layout(residual, conv._residual_note)
    return y, conv.pre_activate(y)


def _trace(module: nn.Module) -> fx.Graph:
    return _Tracer().trace(module)


@dataclass
class _Match:
    nodes: list[fx.Node]  # every node the chain replaces, in order, identities included
    pattern: Pattern
    conv: fx.Node
    bn: fx.Node | None
    add: fx.Node | None
    preact: fx.Node | None = None  # the BatchNorm that reads the add's value, in a pre-activation chain
    pool: fx.Node | None = None  # the max pooling a stem's chain ends in
    act: fx.Node | None = None  # the activation module (not ReLU) a chain ends in

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


def _match(conv: fx.Node, pattern: Pattern, modules, modules_only: bool) -> _Match | None:
    """The chain `pattern` starting at `conv`, or None. Identity modules between steps are skipped."""
    match = _Match([conv], pattern, conv, None, None)
    for step in map(STEPS.__getitem__, pattern.steps):
        previous = match.last
        if step.side_read:  # one of the previous value's readers, which may have others
            found = next((u for u in previous.users if node_kind(u, modules, modules_only) == step.kind and u.args[0] is previous), None)
            if found is None or _features(modules[found.target]) != modules[conv.target].out_channels:
                return None
            match.preact = found
            match.nodes.append(found)
            continue
        found = _single_user(previous)
        while found is not None and node_kind(found, modules, modules_only) == "identity":
            match.nodes.append(found)
            previous, found = found, _single_user(found)
        if found is None or node_kind(found, modules, modules_only) != step.kind:
            return None
        if step.binary:
            if len([a for a in found.args if a is not previous]) != 1:  # x + x: both operands are the chain's value
                return None
            match.add = found
        elif found.args[0] is not previous:
            return None
        if step.kind == "maxpool":
            match.pool = found
        if step.kind == "act":
            match.act = found
        if step.kind.startswith("bn"):
            if _features(modules[found.target]) != modules[conv.target].out_channels:
                return None
            match.bn = found
        match.nodes.append(found)
    return match


def _fused_conv(match: _Match, modules, backend: str, dtype) -> FusedConv2d:
    bn = modules[match.bn.target] if match.bn is not None else None
    relu = "relu" in match.pattern.steps or "bn_relu" in match.pattern.steps
    act = modules[match.act.target] if match.act is not None else bn_activation(bn) if "bn_act" in match.pattern.steps else None
    found = patterns.Match(
        modules[match.conv.target], bn, modules[match.preact.target] if match.preact is not None else None, relu,
        modules[match.pool.target] if match.pool is not None else None, act,
    )
    return match.pattern.build(found, backend, dtype)


def _matches(graph: fx.Graph, modules, rows, modules_only: bool) -> list[_Match]:
    """Non-overlapping matches, in graph order."""
    found, taken = [], set()
    for node in graph.nodes:
        if node in taken or node_kind(node, modules, modules_only) != "conv" or len(node.args) != 1:
            continue
        # The longest row whose nodes no earlier match took: a shortcut's conv -> BN still folds when the
        # add after it went to the other branch's chain.
        for row in rows:
            match = _match(node, row, modules, modules_only)
            if match is not None and not taken.intersection(match.nodes):
                found.append(match)
                taken.update(match.nodes)
                break
    return found


def _group(match: _Match, prefix: str, names: dict[str, str] | None = None) -> FusionGroup:
    """The group of a match; `names` gives the model's path of a module known by another name here."""
    pattern = match.pattern.name
    if match.preact is not None:
        name = (names or {}).get(match.preact.target, prefix + match.preact.target)
        pattern += f" (the add's value and {name} of it, two outputs)"
    return FusionGroup(prefix + match.conv.target, pattern, True)


def _unfused_reason(bn_node: fx.Node, modules, calls: Counter) -> str:
    """Why a BatchNorm node is still in the graph after fusing."""
    bn = modules[bn_node.target]
    if isinstance(bn, _Refused):
        return bn.reason
    problem = bn_problem(bn)
    if problem is not None:
        return problem
    if calls[bn_node.target] > 1:
        return f"this BatchNorm module is called {calls[bn_node.target]} times: folded into one conv, the other calls would change"
    source = bn_node.args[0] if bn_node.args else None
    if not isinstance(source, fx.Node):
        return "its input is not a traced value"
    module = modules.get(source.target) if source.op == "call_module" else None
    if isinstance(module, _Refused) and isinstance(module.module, nn.Conv2d):
        return f"the conv before it must stay as it is: {module.reason}"
    if isinstance(module, nn.Conv2d):
        if conv_problem(module) is not None:
            return f"the conv before it: {conv_problem(module)}"
        if len(source.users) > 1:
            return f"the conv's output is used {len(source.users)} times, not by the BatchNorm alone"
        if module.out_channels != _features(bn):
            return f"the conv has {module.out_channels} output channels, the BatchNorm {_features(bn)}"
        if calls[source.target] > 1:
            return f"the conv before it is called {calls[source.target]} times, and its other calls are not followed by this BatchNorm"
        return "the conv before it is used at several places of the model, which folding one would change"
    if isinstance(module, FusedConv2d):
        return f"it follows {source.target}, a conv already fused with its residual add or BatchNorm"
    if node_kind(source, modules, modules_only=False) == "add":
        return "it follows an add that no conv (-> BN) -> add chain computes, so no conv can write it as a second output"
    what = type(_real(module)).__name__ if module is not None else f"{source.op} {getattr(source.target, '__name__', source.target)}"
    return f"it follows {what}, not a conv: no conv to fold it into"


def _report_unfused(graph: fx.Graph, modules, prefix: str, groups: list[FusionGroup]) -> None:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    reported = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(_real(modules[node.target]), BN_TYPES) and node.target not in reported:
            reported.add(node.target)
            groups.append(FusionGroup(prefix + node.target, "bn", False, _unfused_reason(node, modules, calls)))


def _free_name(root: nn.Module, wanted: str) -> str:
    names = dict(root.named_modules())
    name, i = wanted, 1
    while name in names:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _rewrite(module: nn.Module, backend, dtype, prefix: str, groups, refusals: Refusals, report_rest: bool, tail=None) -> tuple[fx.GraphModule, bool]:
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
    modules = _modules(gm, refusals)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    matches = _matches(graph, modules, patterns.PATTERNS, modules_only=False)
    tail_taken = any(m.preact is tail_node for m in matches if tail_node is not None)
    if tail_node is not None and not tail_taken:  # no chain took it: the caller keeps applying it
        output.args = (tail_node.args[0],)
        graph.erase_node(tail_node)
    for match in matches:
        # A conv called from one place is replaced where it is, keeping its name in the state_dict.
        conv_name = match.conv.target
        name = conv_name if calls[conv_name] == 1 else _free_name(gm, conv_name)
        gm.add_submodule(name, _fused_conv(match, modules, backend, dtype))
        if match.pattern.outputs == 2:
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
        match.last.replace_all_uses_with(out)
        for node in reversed(match.nodes):
            graph.erase_node(node)
        groups.append(_group(match, prefix))
    if report_rest:
        _report_unfused(graph, _modules(gm, refusals), prefix, groups)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, tail_taken


def _substitute(root: nn.Module, backend, dtype, prefix: str, groups, refusals: Refusals) -> None:
    """Folds conv -> BN (-> ReLU) module chains in place: the conv module becomes the FusedConv2d, the BN
    and ReLU modules nn.Identity. Valid when every call of each of these modules is in such a chain.

    A ReLU module shared by several chains (torchvision blocks call one self.relu three times) fails that
    test; the second round folds the conv -> BN part of those chains and leaves the ReLU module called.
    """
    for rows in (_module_patterns(), tuple(p for p in patterns.PATTERNS if p.steps == ("bn",))):
        graph = _trace(root)
        modules = _modules(root, refusals)
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        by_chain = defaultdict(list)
        for match in _matches(graph, modules, rows, modules_only=True):
            by_chain[tuple(n.target for n in match.nodes if node_kind(n, modules, True) != "identity")].append(match)
        for chain, matches in by_chain.items():
            if any(calls[t] != len(matches) or refusals.in_tree[id(modules[t])] != 1 for t in chain):
                continue
            match = matches[0]
            root.set_submodule(chain[0], _fused_conv(match, modules, backend, dtype))
            for target in chain[1:]:
                root.set_submodule(target, nn.Identity())
            groups.extend(_group(m, prefix) for m in matches)
    _report_unfused(_trace(root), _modules(root, refusals), prefix, groups)


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
    for match in _matches(graph, modules, patterns.PATTERNS, modules_only=False):
        if match.add is None:
            continue
        owner, tail, inside = _caller(match.add), None, match.nodes
        if match.preact is not None:
            bn_caller = _caller(match.preact)
            owner = _common_ancestor(owner, bn_caller)
            bn = match.preact.target
            if (
                owner == bn_caller
                and match.pattern.steps[-1] == "preact_bn_relu"
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


def _takes_one_tensor(module: nn.Module) -> bool:
    """Whether `module`'s forward takes exactly one argument, positional, with no default: then a trace of
    it alone (one placeholder) is what every call of it computes. A forward with optional tensors, lists
    or flags would be traced for arguments it may never get."""
    forward = module.__dict__.get("forward", type(module).forward)
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if parameters and parameters[0].name == "self" and "forward" not in module.__dict__:
        parameters = parameters[1:]
    return len(parameters) == 1 and parameters[0].default is inspect.Parameter.empty and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def scan(module: nn.Module, refusals: Refusals, prefix: str = "") -> None:
    """Finds, before any rewrite, the modules whose parameters some forward reads directly (see safety.py),
    in every forward that can be traced and, conservatively, in those that cannot."""
    try:
        graph = _trace(module)
    except Exception:  # an untraceable forward: read its source, then look one level down
        refusals.refuse_below_untraceable(module, prefix.rstrip(".") or "the model")
        for name, child in module.named_children():
            scan(child, refusals, f"{prefix}{name}.")
        return
    refusals.refuse_direct_reads(module, graph, prefix.rstrip(".") or "the model")
    for target, child in _hooked_containers(module):  # the trace stopped at them: their forwards are read apart
        scan(child, refusals, f"{prefix}{target}.")


def fuse_graph(
    module: nn.Module, backend: str, dtype, groups: list[FusionGroup], refusals: Refusals, prefix: str = "", replaceable: bool = True
) -> nn.Module:
    """Fuses every match in `module` (changed in place; it must be the caller's copy) and returns the result,
    which is `module` itself unless its own forward holds a residual chain (then a GraphModule; never when
    not `replaceable`, as for a module with hooks).

    `groups` receives a FusionGroup per fused chain and per BatchNorm left unfused, named from `prefix`.
    """
    if isinstance(module, _LEAVES):
        if isinstance(module, BN_TYPES):
            reason = refusals.reason(module) or (
                "its parent's forward cannot be traced" if prefix else "a BatchNorm alone: no conv to fold it into"
            )
            groups.append(FusionGroup(prefix.rstrip("."), "bn", False, reason))
        return module
    try:
        graph = _trace(module)
    except Exception:  # torch.fx cannot trace this forward (data-dependent control flow...): go one level down
        for name, child in list(module._modules.items()):
            if child is not None:
                fused_child = fuse_graph(child, backend, dtype, groups, refusals, f"{prefix}{name}.", replaceable=refusals.in_tree[id(child)] == 1)
                setattr(module, name, fused_child)
        return module
    refusals.refuse_direct_reads(module, graph, prefix.rstrip(".") or "the model")
    owners = _owners_of_residual_chains(graph, _modules(module, refusals), refusals.in_tree)
    if "" in owners and replaceable and _takes_one_tensor(module):
        reported = len(groups)
        try:
            return _rewrite(module, backend, dtype, prefix, groups, refusals, report_rest=True)[0]
        except Exception:  # its forward cannot be traced on its own: its chains are fused in place below
            del groups[reported:]
    for owner, tail in sorted(owners.items()):
        if not owner:
            continue
        owned = module.get_submodule(owner)
        if refusals.in_tree[id(owned)] != 1 or not _takes_one_tensor(owned):
            continue  # shared, or called with arguments a trace of it alone cannot stand for: fused in place below
        tail_bn = None if tail is None else (prefix + tail, module.get_submodule(tail))
        reported = len(groups)
        try:
            fused_owner, tail_taken = _rewrite(owned, backend, dtype, f"{prefix}{owner}.", groups, refusals, False, tail_bn)
        except Exception:
            del groups[reported:]
            continue
        module.set_submodule(owner, fused_owner)
        if tail_taken:
            module.set_submodule(tail, nn.Identity())
    _substitute(module, backend, dtype, prefix, groups, refusals)
    # Modules with hooks stay, so that their hooks fire as before; what they hold is fused in place.
    for target, child in _hooked_containers(module):
        fuse_graph(child, backend, dtype, groups, refusals, f"{prefix}{target}.", replaceable=False)
    return module


def _hooked_containers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules with hooks (and children) that a trace of `module` stops at, once each."""
    found = {}
    for node in _trace(module).nodes:
        if node.op == "call_module":
            child = module.get_submodule(node.target)
            if hook_problem(child) is not None and not isinstance(child, _LEAVES) and any(True for _ in child.children()):
                found.setdefault(id(child), (node.target, child))
    return list(found.values())
