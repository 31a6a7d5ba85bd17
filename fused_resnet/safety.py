"""What the fuser must know before it rewrites part of a model: which modules must stay as they are.

A rewrite folds parameters into new modules and replaces or removes modules. That changes nothing the
model can observe only when no one else reads those parameters and no hook watches those modules. A
Refusals object holds, for each module that must stay as it is, the reason; the graph pass and the
block swap consult it, and fr.inspect reports it.

- hooks and parametrizations: known_modules.hook_problem (checked where a module is matched);
- tied parameters: a parameter (or buffer) held by more than one module;
- direct reads: a parameter read in some forward other than its module's own (`F.conv2d(x,
  self.conv.weight)`), seen as a get_attr node of a traced forward, or, in a forward torch.fx cannot
  trace, any attribute named like a parameter in its source (conservative: then nothing below it is
  folded).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections import Counter, defaultdict

from torch import fx, nn

from .fold import BN_TYPES

_PARAMETER_NAMES = {"weight", "bias", "running_mean", "running_var", "weight_g", "weight_v", "weight_orig"}
# Calls that hand out every parameter of a module at once.
_BULK_READS = {"parameters", "named_parameters", "buffers", "named_buffers", "state_dict"}


class Refusals:
    """The modules of one model the fuser must leave as they are, by identity, with the reason."""

    def __init__(self, model: nn.Module):
        self.reasons: dict[int, str] = {}
        # How often each module occurs in the tree: a module used at two places is never replaced at one.
        self.in_tree = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self._refuse_tied(model)

    def refuse(self, module: nn.Module, reason: str) -> None:
        self.reasons.setdefault(id(module), reason)

    def reason(self, module: nn.Module) -> str | None:
        return self.reasons.get(id(module))

    def any_refused(self, module: nn.Module) -> str | None:
        """The reason of the first module in `module`'s tree that must stay as it is, or None."""
        return next((f"{name or 'it'}: {self.reasons[id(m)]}" for name, m in module.named_modules() if id(m) in self.reasons), None)

    def _refuse_tied(self, model: nn.Module) -> None:
        holders = defaultdict(dict)  # id(tensor) -> {id(module): path}
        for path, module in model.named_modules():
            for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None:
                    holders[id(tensor)][id(module)] = (f"{path}.{name}" if path else name, module)
        for held in holders.values():
            if len(held) > 1:
                names = [name for name, _ in held.values()]
                for name, module in held.values():
                    others = ", ".join(n for n in names if n != name)
                    self.refuse(module, f"{name} is the same tensor as {others} (tied): folding would untie them")

    def refuse_direct_reads(self, root: nn.Module, graph: fx.Graph, where: str) -> None:
        """Refuses the modules whose parameters or buffers a traced forward (`graph`, of `root`) reads directly."""
        for node in graph.nodes:
            if node.op != "get_attr":
                continue
            path, _, attr = node.target.rpartition(".")
            try:
                owner = root.get_submodule(path)
            except AttributeError:
                continue
            if attr in owner._modules:  # a module (a fused chain a previous rewrite made), not a tensor
                continue
            self.refuse(owner, f"its {attr} is also read directly in the forward of {where}")

    def refuse_below_untraceable(self, module: nn.Module, where: str) -> None:
        """`module`'s forward cannot be traced: if its source may read parameters of modules below it,
        refuse them all (a fold there could change what it reads)."""
        if not _may_read_parameters(module):
            return
        for child in module.modules():
            if child is not module and isinstance(child, (nn.Conv2d, *BN_TYPES)):
                self.refuse(child, f"the forward of {where}, which torch.fx cannot trace, may read its parameters directly")


def _may_read_parameters(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward", type(module).forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return True  # no source to read: cannot tell
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (node.attr in _PARAMETER_NAMES or node.attr in _BULK_READS):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
            return True  # an attribute by name: could be any of them
    return False
