"""The data layer's structure, checked on its source (ast): no import cycle among the modules of
``radpretrain.data`` and ``radpretrain.synthetic`` (function-level imports included, so none can hide
one), function-level imports only of heavy or optional dependencies and saying so, and no module
state: no ``global`` statement, no module-level object changed by a function (caches excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

import radpretrain

PACKAGE = Path(radpretrain.__file__).parent
LAYERS = ("data", "synthetic")
# what a function may import: dependencies heavy to import, or optional
HEAVY_OR_OPTIONAL = ("pydicom", "nibabel", "scipy", "matplotlib", "dicomweb_client")
MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault", "add", "discard",
            "remove", "sort", "reverse"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for layer in LAYERS:
        for path in sorted((PACKAGE / layer).glob("*.py")):
            name = f"radpretrain.{layer}" + ("" if path.stem == "__init__" else f".{path.stem}")
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _imports(tree: ast.Module):
    """(imported module, the modules it may name, statement, inside a function?) for every import."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, {a.name}, child, in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # 'from radpretrain.data import readers' imports the module radpretrain.data.readers
                names = {child.module} | {f"{child.module}.{a.name}" for a in child.names}
                yield child.module, names, child, in_function
            yield from visit(child, inner)
    yield from visit(tree, False)


def test_no_import_cycle_in_the_data_layer():
    mods = _modules()
    packages = {f"radpretrain.{layer}" for layer in LAYERS}
    graph = {m: sorted({t for _, names, _, _ in _imports(tree) for t in names
                        if t in mods and t != m and t not in packages})
             for m, (_, tree) in mods.items()}
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            dfs(m)
    assert "radpretrain.data.manifest" in graph and "radpretrain.synthetic.archive" in graph


def test_function_level_imports_are_heavy_or_optional_and_say_so():
    bad = []
    for name, (path, tree) in _modules().items():
        lines = path.read_text().splitlines()
        for module, names, node, in_function in _imports(tree):
            where = f"{path.name}:{node.lineno} imports {module} in a function"
            if not in_function:
                continue
            if not module.startswith(HEAVY_OR_OPTIONAL):
                bad.append(f"{where} (neither heavy nor optional: import it at the top)")
            elif "#" not in lines[node.lineno - 1] and "#" not in lines[node.lineno - 2]:
                bad.append(f"{where} without a comment saying why")
    assert not bad, "\n".join(bad)


def _module_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _local_names(fn) -> set[str]:
    args = fn.args
    names = {a.arg for a in args.args + args.kwonlyargs + args.posonlyargs}
    names.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    names.update(n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


def test_no_module_holds_state_in_globals():
    bad = []
    for name, (path, tree) in _modules().items():
        module_names = {n for n in _module_names(tree) if "CACHE" not in n.upper()}
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            local = _local_names(fn)
            shared = module_names - local
            for node in ast.walk(fn):
                where = f"{path.name}:{getattr(node, 'lineno', fn.lineno)} ({fn.name})"
                if isinstance(node, ast.Global):
                    bad.append(f"{where}: global {', '.join(node.names)}")
                elif (isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del))
                      and isinstance(node.value, ast.Name) and node.value.id in shared):
                    bad.append(f"{where}: changes {node.value.id}")
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                      and isinstance(node.func.value, ast.Name) and node.func.value.id in shared):
                    bad.append(f"{where}: {node.func.value.id}.{node.func.attr}()")
    assert not bad, "\n".join(bad)
