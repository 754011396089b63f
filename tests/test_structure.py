"""The whole package's structure, checked on its source with ``ast``:

- no import cycle among the modules, function-level imports included (so none can hide one);
- function-level imports only of dependencies that are heavy to import or optional, each with a
  comment saying so (plus the few lazy imports of our own modules listed in ``LAZY_OWN`` with
  their reason);
- no module state: no ``global`` statement and no module-level object changed by a function,
  except registries filled at import by decorators (a decorator's inner function) and caches.

Edges of the import graph: ``import a.b`` / ``from a.b import x`` is an edge to the module
``a.b`` (and to ``a.b.x`` when that is a module).  The parent package that Python initialises on
the way is not an edge: a package's ``__init__`` that re-exports its submodules would otherwise
"cycle" with each of them.  Names taken from a package's ``__init__`` (``from radpretrain.pretrain
import pretrain``) are edges to that ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import radpretrain

PACKAGE = Path(radpretrain.__file__).parent
# What a function may import, and why: each of these takes a second or more to import or is an
# optional / native extra that most commands never need.
HEAVY_OR_OPTIONAL = {
    "pydicom": "DICOM decoding (and its pixel handlers) only where a DICOM file is read",
    "nibabel": "NIfTI volumes only",
    "scipy": "a few filters in the synthetic archive and CT geometry",
    "matplotlib": "figures only (info's grid, report plots)",
    "dicomweb_client": "radpretrain pull only",
    "lightning": "about 5 s to import; only the pretraining engine and its methods need it",
    "timm": "about 3 s to import; the data layer, the CLI and the reports do not need it",
    "lightly": "about 3 s to import (torchvision); only the methods that use its heads and losses",
    "sklearn": "more than a second to import; probes and metrics only",
    "faiss": "a native library (CPU or GPU build); k-means and neighbour search only",
    "huggingface_hub": "only to look up the Hub's cache for ImageNet weights",
}
# The data layer (data/, synthetic/) reads files and never needs the training stack: only these.
DATA_LAYER_LAZY = ("pydicom", "nibabel", "scipy", "matplotlib", "dicomweb_client")
# Lazy imports of our own modules: (module file, imported module) -> reason
LAZY_OWN = {
    ("__init__.py", "radpretrain.encoder"):
        "'import radpretrain' (and so 'radpretrain --help') stays free of torch; load_encoder imports it on use",
    ("export/card.py", "radpretrain.methods"):
        "the method classes import Lightning (~3 s); 'radpretrain export --help' and the card's other "
        "helpers do not need them, only a card's method line does",
}
MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault", "add", "discard",
            "remove", "sort", "reverse"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _imports(tree: ast.Module):
    """(imported module, the modules it may name, statement, inside a function?) for every import."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, [a.name], child, in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, [child.module] + [f"{child.module}.{a.name}" for a in child.names], child, in_function
            yield from visit(child, inner)
    yield from visit(tree, False)


def _graph(mods) -> dict[str, list[str]]:
    packages = {m for m, (p, _) in mods.items() if p.name == "__init__.py"}
    graph = {}
    for m, (_, tree) in mods.items():
        targets = set()
        for module, names, _, _ in _imports(tree):
            submodules = [t for t in names[1:] if t in mods]
            if module in mods and (module not in packages or len(submodules) < len(names) - 1):
                targets.add(module)  # a module, or names defined in a package's __init__
            targets.update(submodules)
        graph[m] = sorted(targets - {m})
    return graph


def _find_cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = dfs(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in graph:
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    mods = _modules()
    graph = _graph(mods)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the graph is the real one: known edges are in it, function-level ones too
    assert "radpretrain.data.readers" in graph["radpretrain.encoder"]
    assert "radpretrain.methods.base" in graph["radpretrain.methods.mae"]
    assert "radpretrain.encoder" in graph["radpretrain"]


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None
    src = {"pkg": (Path("pkg/__init__.py"), ast.parse("from pkg.sub import f\n")),
           "pkg.sub": (Path("pkg/sub.py"), ast.parse("def g():\n    from pkg import helper\n")),
           "pkg.other": (Path("pkg/other.py"), ast.parse("from pkg import sub\n"))}
    graph = _graph(src)
    assert graph == {"pkg": ["pkg.sub"], "pkg.sub": ["pkg"], "pkg.other": ["pkg.sub"]}
    assert _find_cycle(graph) == ["pkg", "pkg.sub", "pkg"]


def test_function_level_imports_are_heavy_or_optional_and_say_so():
    bad = []
    for name, (path, tree) in _modules().items():
        lines = path.read_text().splitlines()
        rel = str(path.relative_to(PACKAGE))
        for module, _, node, in_function in _imports(tree):
            if not in_function:
                continue
            where = f"{rel}:{node.lineno} imports {module} in a function"
            if (rel, module) in LAZY_OWN:
                continue
            allowed = DATA_LAYER_LAZY if rel.startswith(("data/", "synthetic/")) else HEAVY_OR_OPTIONAL
            if module.split(".")[0] not in allowed:
                bad.append(f"{where} (neither heavy nor optional here: import it at the top)")
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


def _decorator_inner_functions(tree: ast.Module) -> set[ast.AST]:
    """Inner functions that a module-level function returns: the body of a decorator factory."""
    inner = set()
    for outer in tree.body:
        if not isinstance(outer, ast.FunctionDef):
            continue
        defs = {n.name: n for n in outer.body if isinstance(n, ast.FunctionDef)}
        for node in outer.body:
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Name) and node.value.id in defs:
                inner.add(defs[node.value.id])
    return inner


def _own_nodes(fn):
    """The nodes of a function's body, not those of the functions nested in it (checked on their own)."""
    for child in ast.iter_child_nodes(fn):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _own_nodes(child)


def _state_problems(path: Path, tree: ast.Module) -> list[str]:
    bad = []
    module_names = {n for n in _module_names(tree) if "CACHE" not in n.upper()}
    registries = _decorator_inner_functions(tree)
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        shared = module_names - _local_names(fn)
        for node in _own_nodes(fn):
            where = f"{path.name}:{getattr(node, 'lineno', fn.lineno)} ({fn.name})"
            if isinstance(node, ast.Global):
                bad.append(f"{where}: global {', '.join(node.names)}")
                continue
            if fn in registries:  # a decorator recording what it decorates (a registry filled at import)
                continue
            if (isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del))
                    and isinstance(node.value, ast.Name) and node.value.id in shared):
                bad.append(f"{where}: changes {node.value.id}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in shared):
                bad.append(f"{where}: {node.func.value.id}.{node.func.attr}()")
    return bad


def test_no_module_holds_state_in_globals():
    bad = []
    for _, (path, tree) in _modules().items():
        bad += _state_problems(path, tree)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, problem", [
    ("STATE = {}\ndef f(k):\n    STATE[k] = 1\n", "changes STATE"),
    ("SEEN = []\ndef f(k):\n    SEEN.append(k)\n", "SEEN.append()"),
    ("n = 0\ndef f():\n    global n\n    n += 1\n", "global n"),
    ("REG = {}\ndef reg(name):\n    def deco(cls):\n        REG[name] = cls\n        return cls\n    return deco\n", None),
    ("_CACHE = {}\ndef f(k):\n    _CACHE[k] = 1\n", None),
])
def test_the_state_check_tells_registries_from_state(source, problem):
    found = _state_problems(Path("m.py"), ast.parse(source))
    assert (problem is None and not found) or (problem is not None and len(found) == 1 and problem in found[0])
