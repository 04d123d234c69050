"""The package's import graph: no cycles (imports inside functions counted), and imports inside
functions only where they put off a heavy dependency.

Read from the source with `ast`, nothing imported: every module of gemma_keras/, converters/
(gemma_keras.converters) and tflite/ (gemma_keras.tflite).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gemma_keras": ROOT / "gemma_keras",
            "gemma_keras.converters": ROOT / "converters",
            "gemma_keras.tflite": ROOT / "tflite"}

# Third-party packages a module may import inside a function: optional extras, or large
# libraries that a light path (the TFLite runtime, `gemma-keras --help`, another Keras
# backend) must not load.
HEAVY = {"tensorflow", "tensorflow_text", "tensorflow_serving", "keras", "keras_hub", "jax",
         "torch", "transformers", "peft", "ai_edge_litert", "ai_edge_quantizer", "litert_lm",
         "litert_lm_builder", "lm_eval"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name, path):
    """`(imported name, line, inside a function)` for every import statement of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([child.module] if child.module else []))
                found.extend((f"{base}.{alias.name}", child.lineno, in_function)
                             for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


def _project_module(imported, modules):
    """The project module an import name loads (`a.b.name` -> `a.b`), or None."""
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def _graph():
    """`(edges, lazy)`: module -> {module: (line, inside a function)} for project imports, and
    the imports inside functions as (module, imported, line)."""
    modules = _modules()
    edges = {name: {} for name in modules}
    lazy = []
    for name, path in modules.items():
        for imported, line, in_function in _imports(name, path):
            target = _project_module(imported, modules)
            if in_function and (name, target or imported, line) not in lazy:
                lazy.append((name, target or imported, line))
            if target is None or target == name:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first (the importer's own
            # packages are already being imported when it runs)
            parents = [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 1)]
            parents = [p for p in parents if not name.startswith(p + ".")]
            for module in [target, *parents]:
                if module in modules and module != name:
                    edges[name].setdefault(module, (line, in_function))
    return modules, edges, lazy


def _find_cycle(edges):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _heavy_at_import(modules, edges):
    """Module -> the HEAVY packages importing it loads (its top-level imports, transitively)."""
    direct = {name: {imported.split(".")[0] for imported, _, in_function in _imports(name, path)
                     if not in_function and imported.split(".")[0] in HEAVY}
              for name, path in modules.items()}
    heavy = {}

    def closure(name, seen):
        if name in heavy:
            return heavy[name]
        seen.add(name)
        out = set(direct[name])
        for target, (_, in_function) in edges[name].items():
            if not in_function and target not in seen:
                out |= closure(target, seen)
        heavy[name] = out
        return out

    for name in modules:
        closure(name, set())
    return heavy


def test_no_import_cycle():
    modules, edges, _ = _graph()
    cycle = _find_cycle(edges)
    if cycle:
        steps = [f"  {a} imports {b} ({modules[a].relative_to(ROOT)}:{edges[a][b][0]}"
                 f"{', inside a function' if edges[a][b][1] else ''})"
                 for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle:\n" + "\n".join(steps))


def test_imports_inside_functions_only_put_off_heavy_dependencies():
    """An import inside a function loads a HEAVY package, or a project module that loads one
    its importer does not (so that, for example, `gemma-keras chat --tflite` and a `.tflite`
    scorer never load Keras)."""
    modules, edges, lazy = _graph()
    heavy = _heavy_at_import(modules, edges)
    bad = []
    for name, imported, line in lazy:
        if imported in modules:
            if heavy[imported] - heavy[name]:
                continue
        elif imported.split(".")[0] in HEAVY:
            continue
        bad.append(f"  {modules[name].relative_to(ROOT)}:{line}: import {imported}")
    assert not bad, ("imports inside functions that put off no heavy dependency (move them "
                     "to the top of the module):\n" + "\n".join(bad))


def test_the_checks_see_cycles_and_lazy_imports(tmp_path, monkeypatch):
    """The graph finds a cycle through a function-level import, and the lazy-import check
    flags a light one."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("from gemma_keras.b import f\n")
    (folder / "b.py").write_text("def f():\n    import json\n    from gemma_keras import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", {"gemma_keras": folder})
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules, edges, lazy = _graph()
    assert _find_cycle(edges) == ["gemma_keras.a", "gemma_keras.b", "gemma_keras.a"]
    assert ("gemma_keras.b", "json", 2) in lazy and ("gemma_keras.b", "gemma_keras.a", 3) in lazy
