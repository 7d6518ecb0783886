"""The package's layering: no import cycle among dpo_kernels' modules, imports inside functions included,
and only the ops layer names ``torch.ops.dpo_kernels``."""

import ast
import pathlib

import dpo_kernels

ROOT = pathlib.Path(dpo_kernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    # the compiled extension imports nothing of the package, built or not
    return {**{_module_name(p): p for p in ROOT.rglob("*.py")}, "dpo_kernels._C": None}


def _imports(name: str, path: pathlib.Path, modules: dict) -> set:
    """The dpo_kernels modules ``name`` imports anywhere in its body: ``from .x import y`` counts as y where y
    is a module, else as x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) if path else set() for name, path in modules.items()}
    assert graph["dpo_kernels.functional"] >= {"dpo_kernels.tokens", "dpo_kernels.sharding"}  # the walk sees edges
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_ops_layer_names_torch_ops():
    writers = sorted(
        _module_name(p)
        for p in ROOT.rglob("*.py")
        if "torch.ops.dpo_kernels" in p.read_text() and not _module_name(p).startswith("dpo_kernels.ops")
    )
    assert writers == [], writers
