"""The package's import graph: which module imports which, the imports that climb a layer, and cycles.

    python tools/import_graph.py [--package fused_resnet]

Layers are read from LAYERS below (lowest first), the order docs/design.md gives: a module may import only
modules of its own layer or lower ones. Imports inside functions count too (they are still
dependencies), except those under `if TYPE_CHECKING:`. Prints the upward imports, the cycles, and the
largest modules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# Compiled modules, which have no .py file to read.
EXTENSION_MODULES = {"fused_resnet._C", "fused_resnet._cpu"}

# Lowest first. A module is placed by the first prefix that matches its dotted name.
LAYERS = (
    ("base", ("fused_resnet._build", "fused_resnet.validation", "fused_resnet.call", "fused_resnet.parity",
              "fused_resnet.timing", "fused_resnet.fold", "fused_resnet.derivatives", "fused_resnet.cpu_isa",
              "fused_resnet.version", "fused_resnet._cpu", "fused_resnet.cpu_extension",
              "fused_resnet.memory_format", "fused_resnet.cpu_memory")),
    ("kernel", ("fused_resnet._C", "fused_resnet.autotune", "fused_resnet.backends.")),
    ("backend registry", ("fused_resnet.backends",)),
    ("self-check", ("fused_resnet.self_check",)),
    ("dispatch", ("fused_resnet.dispatch",)),
    ("op", ("fused_resnet.ops", "fused_resnet.onednn_stages")),
    ("lowering", ("fused_resnet.export", "fused_resnet.triton_ops")),
    ("module", ("fused_resnet.layout", "fused_resnet.nn", "fused_resnet.known_modules", "fused_resnet.cuda_graph")),
    ("fuser", ("fused_resnet.patterns", "fused_resnet.graph_fuse", "fused_resnet.safety", "fused_resnet.layout_plan")),
    ("convert", ("fused_resnet.convert",)),
    ("report", ("fused_resnet.fusion_report", "fused_resnet.architectures", "fused_resnet.peers", "fused_resnet.inference_engines")),
    ("application", ("fused_resnet.usage", "fused_resnet.cli_options", "fused_resnet.predict_output", "fused_resnet.predict",
                     "fused_resnet.scale", "fused_resnet.predict_cli", "fused_resnet.serve")),
    ("entry", ("fused_resnet.__main__", "fused_resnet.cli", "fused_resnet")),
)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix.endswith(".") and module.startswith(prefix)) or module.startswith(prefix + "."):
                return index
    raise KeyError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules that `module` (at `path`) imports."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            # `from . import x` may import a submodule x, or a name defined in the package.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="fused_resnet")
    parser.add_argument("--largest", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.package).resolve()
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(paths) | EXTENSION_MODULES
    graph = {m: imports(p, m, known) for m, p in paths.items()}
    graph.update({m: set() for m in EXTENSION_MODULES})
    # The package's own __init__ re-exports the public API: it sits on top, and its submodules
    # importing "fused_resnet" for a name would be an upward import like any other.
    upward = sorted((m, d) for m, ds in graph.items() for d in ds if layer_of(d) > layer_of(m))
    found = cycles(graph)
    print(f"{len(paths)} modules, {sum(map(len, graph.values()))} imports between them")
    print(f"upward imports: {len(upward)}")
    for m, d in upward:
        print(f"  {m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})")
    print(f"cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in paths.items()), reverse=True)
    print("largest modules (lines): " + ", ".join(f"{m} {n}" for n, m in sizes[: args.largest]))
    return 1 if upward or found else 0


if __name__ == "__main__":
    sys.exit(main())
