"""The fuse-time half of layout.py: which fused outputs only fused modules read.

The fused model is traced (fused modules are leaves, residual chains are calls of conv_add_residual or
conv_add_preact). A fused module that returns eager's layout and is called at one place is a producer
when fused modules, each called at one place, read its output (each of its outputs, for a
pre-activation conv) as their input or residual:
  (nn.Identity modules between them hand on the very tensor, and are watched like the readers)
- each reader gets the producer's note (`_x_note` or `_residual_note`);
- if nothing else reads it, the producer also gets a StayToken, and the closest module whose forward
  calls the producer and every reader (the ancestor) gets a Stay under that token: the modules whose
  hooks could see the tensor (producer, readers and every module between them and the ancestor), and
  each module on those paths with the children it has now;
- if code of the model's own reads it too (a returned feature map, a `.view`), the producer returns
  eager's layout, and its fused readers use the channels_last twin it notes.
A model that cannot be traced is planned child by child: a tensor that crosses a forward no trace saw
always has eager's layout. Modules with hooks, where the trace stops, are planned inside on their own.
"""

from __future__ import annotations

import operator
from collections import Counter

from torch import fx, nn

from .graph_fuse import _hooked_containers, _trace, conv_add_preact, conv_add_residual
from .layout import PLAN_ATTRIBUTE, LayoutNote, Stay, StayToken
from .nn import FusedConv2d, FusedConv2dPreact, FusedResNet, _FusedResidualBlock

_RESIDUAL_CHAINS = (conv_add_residual, conv_add_preact)


def plan_layouts(model: nn.Module) -> int:
    """Plans every fused module of `model` afresh (see the module docstring); returns how many may keep
    channels_last."""
    remove_plan(model)
    return _plan_tree(model)


def remove_plan(model: nn.Module) -> nn.Module:
    """Every fused module of `model` converts its output to eager's layout again, at every boundary (for
    comparisons). Returns `model`."""
    for module in model.modules():
        for name in (PLAN_ATTRIBUTE, "_note", "_stay", "_x_note", "_residual_note"):
            module.__dict__.pop(name, None)
    return model


def _plan_tree(model: nn.Module) -> int:
    if isinstance(model, (FusedResNet, FusedConv2d, _FusedResidualBlock)):
        return 0  # FusedResNet is channels_last inside by construction
    try:
        graph = _trace(model)
    except Exception:
        return sum(_plan_tree(child) for child in model.children())
    staying = _plan(model, graph)
    return staying + sum(_plan_tree(child) for _, child in _hooked_containers(model))


def _fused_call(node: fx.Node, root: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the fused module a node calls, or None."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return (node.target, module) if isinstance(module, (FusedConv2d, _FusedResidualBlock)) else None
    if node.op == "call_function" and node.target in _RESIDUAL_CHAINS:
        conv = node.args[0]
        if isinstance(conv, fx.Node) and conv.op == "get_attr":
            return conv.target, root.get_submodule(conv.target)
    return None


def _is_identity(node: fx.Node, root: nn.Module) -> bool:
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return False
    module = root.get_submodule(node.target)
    return type(module) is nn.Identity and "forward" not in module.__dict__


def _positions(reader: fx.Node, value: fx.Node) -> list[str] | None:
    """Where the fused call `reader` reads `value` ("x", "residual"), or None if it reads it otherwise."""
    if reader.kwargs and value in reader.kwargs.values():
        return None
    if reader.op == "call_module":
        names = ("x",)
    else:
        names = (None, "x", "residual")  # conv_add_*(conv, x, residual)
    found = []
    for i, arg in enumerate(reader.args):
        if arg is value:
            if i >= len(names) or names[i] is None:
                return None
            found.append(names[i])
    return found


def _uses(graph: fx.Graph, root: nn.Module) -> Counter:
    """How many places use each fused module (a call, or a reference to it other than a residual chain's)."""
    uses = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] += 1
        elif node.op == "get_attr":
            uses[node.target] += len(node.users)
            if any(u.op != "call_function" or u.target not in _RESIDUAL_CHAINS or u.args[0] is not node or node in u.args[1:] for u in node.users):
                uses[node.target] += 2  # read as something other than the chain's conv: never planned
    return uses


def _outputs(node: fx.Node, module: nn.Module) -> list[fx.Node] | None:
    """The nodes of the producer's output tensors: its getitems for a pre-activation conv's (y, z)."""
    if not isinstance(module, FusedConv2dPreact):
        return [node]
    if not node.users or any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] not in (0, 1) for u in node.users):
        return None
    return list(node.users)


def _chain(node: fx.Node, path: str) -> list[str]:
    """The paths of the modules whose forwards hold the call, outermost first, then the called module's."""
    stack = [qualified for qualified, _ in node.meta.get("nn_module_stack", {}).values()]
    if stack and stack[-1] == path:
        stack = stack[:-1]
    return [*stack, path]


def _as_planned(module: nn.Module) -> tuple:
    return module, tuple(module._modules.values()), module.__dict__.get("forward")


def _plan(root: nn.Module, graph: fx.Graph) -> int:
    uses = _uses(graph, root)
    staying = 0
    for node in graph.nodes:
        called = _fused_call(node, root)
        if called is None or uses[called[0]] != 1 or called[1].output_layout != "as_eager":
            continue
        path, producer = called
        outputs = _outputs(node, producer)
        if outputs is None:
            continue
        readers, passed, foreign = [], [], False
        values = list(outputs)
        while values:
            value = values.pop()
            for user in value.users:
                if _is_identity(user, root):  # hands on the very tensor: its readers read ours
                    passed.append(user)
                    values.append(user)
                    continue
                reader = _fused_call(user, root)
                positions = _positions(user, value) if reader is not None and uses[reader[0]] == 1 else None
                if not positions:
                    foreign = True
                    continue
                readers.append((user, reader, positions))
        if not readers:
            continue
        note = producer._note = LayoutNote()
        for _, (_, module), positions in readers:
            for position in positions:
                setattr(module, f"_{position}_note", note)
        if foreign:
            continue  # eager's layout, with a twin for the fused readers
        chains = [_chain(node, path)] + [_chain(user, reader_path) for user, (reader_path, _), _ in readers]
        chains += [_chain(identity, identity.target) for identity in passed]
        depth = 0
        while all(len(c) > depth + 1 and c[depth] == chains[0][depth] for c in chains):
            depth += 1
        ancestor_path = chains[0][depth - 1] if depth else ""
        ancestor = root.get_submodule(ancestor_path)
        below = {p for c in chains for p in c[depth:]}
        containers = (root.get_submodule(p) for c in chains for p in c[depth:-1])
        watched = tuple({id(m): m for m in (root.get_submodule(p) for p in sorted(below))}.values())
        token = producer._stay = StayToken()
        ancestor.__dict__.setdefault(PLAN_ATTRIBUTE, {})[token] = Stay(
            watched, tuple({id(m): _as_planned(m) for m in containers}.values()), *_as_planned(ancestor)[1:]
        )
        staying += 1
    return staying
