"""The one import rule, enforced: imports point down the layers, at module top, public names only.

Layers, lowest first (README, "Architecture")::

    sim.core  <-  defenses  <-  strategies  <-  attacks  <-  sim.engine  <-  sim.commands  <-  baselines

A module may import its own layer and the layers below it, never above. Project imports
sit at module top: function-local imports hid the cycles this test exists to prevent. A
function-local import is allowed only for an optional or heavy dependency and must say why
in a comment on its line or the line above: a third-party package, or a module of the
importer's own layer (the CLI loads its sub-commands, which pull in torch, diffusers and
flwr, only once one runs). No name starting with ``_`` crosses from one layer to another. And no cycle among
module-level imports, inside a layer or across.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["sim.core", "defenses", "strategies", "attacks", "sim.engine", "sim.commands", "baselines"]
PACKAGES = ("sim", "defenses", "strategies", "attacks", "baselines")


def layer_of(module: str) -> int | None:
    """Index of the layer ``module`` belongs to; None for the bare ``sim`` package (which imports nothing)."""
    for i, layer in reversed(list(enumerate(LAYERS))):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = all_modules()


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    pkg = pkg[:len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def imports(module: str, path: Path):
    """(target module, imported names, lineno, at module top) for every import of a project module,
    and (module, lineno, at top) for every other import."""
    tree = ast.parse(path.read_text(), str(path))
    project, other = [], []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            inside = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    (project if a.name.split(".")[0] in PACKAGES else other).append(
                        (a.name, [], child.lineno, top) if a.name.split(".")[0] in PACKAGES else (a.name, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                target = resolve(module, path, child)
                if target.split(".")[0] in PACKAGES:
                    names = [a.name for a in child.names]
                    # "from pkg import mod" imports a module, not a name
                    for n in names:
                        sub = f"{target}.{n}"
                        project.append((sub, [], child.lineno, top) if sub in MODULES else (target, [n], child.lineno, top))
                elif target != "__future__":
                    other.append((target, child.lineno, top))
            visit(child, inside)

    visit(tree, True)
    return project, other


def comment_lines(path: Path) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if tok.type == tokenize.COMMENT}


def test_every_project_module_is_in_a_layer():
    assert MODULES, "no modules found"
    loose = [m for m in MODULES if layer_of(m) is None and m != "sim"]
    assert not loose, f"modules outside every layer: {loose}"
    assert not imports("sim", MODULES["sim"])[0], "sim/__init__.py must import nothing (it sits above no layer)"


def check_module(module: str, path: Path) -> list[str]:
    """What breaks the rule in one module (empty: nothing)."""
    project, other = imports(module, path)
    mine = layer_of(module)
    problems = []
    comments = comment_lines(path)
    for target, names, line, top in project:
        there = layer_of(target)
        if there is not None and mine is not None and there > mine:
            problems.append(f"line {line}: imports {target} ({LAYERS[there]}) from the lower layer {LAYERS[mine]}")
        if not top and (there != mine or not ({line, line - 1} & comments)):
            problems.append(f"line {line}: function-local import of {target}; project imports go at module top "
                            "(a lazy one only within the importer's layer, with a comment saying why)")
        if there != mine and any(n.startswith("_") for n in names):
            problems.append(f"line {line}: private name(s) {[n for n in names if n.startswith('_')]} of {target} "
                            f"cross into {module}")
        if there != mine and target.rsplit(".", 1)[-1].startswith("_"):
            problems.append(f"line {line}: private module {target} imported from another layer")
    for target, line, top in other:
        if not top and not ({line, line - 1} & comments):
            problems.append(f"line {line}: function-local import of {target} without a comment saying why "
                            "(optional or heavy dependency)")
    return list(dict.fromkeys(problems))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_at_module_top_public_only(module):
    problems = check_module(module, MODULES[module])
    assert not problems, f"{MODULES[module].relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _, top in imports(m, p)[0] if top and t in MODULES} - {m})
             for m, p in MODULES.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"module-level import cycles: {cycles}"


def test_the_rule_catches_what_it_forbids(tmp_path):
    """The checker itself can fail: an upward import, a function-local project import, a private
    name from another layer and an unexplained lazy import are each reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from sim.engine.runner import run_compare\nfrom sim.engine.grid import _hidden\n\n\n"
                     "def f():\n    from strategies import STRATEGIES\n    import scipy\n")
    problems = "\n".join(check_module("sim.core.probe", probe))
    assert "imports sim.engine.runner (sim.engine) from the lower layer sim.core" in problems
    assert "function-local import of strategies" in problems
    assert "private name(s) ['_hidden']" in problems
    assert "function-local import of scipy without a comment" in problems
    probe.write_text("import numpy\n\n\ndef f():\n    import scipy  # heavy: only this command needs it\n"
                     "    from sim.core.data import make_fill50k  # lazy: same layer, heavy\n")
    assert check_module("sim.core.probe", probe) == []
    probe.write_text("def f():\n    from sim.core.data import make_fill50k\n")  # same layer, but no reason given
    assert "function-local import of sim.core.data" in "\n".join(check_module("sim.core.probe", probe))


def test_no_attack_can_reach_the_client_side_reader():
    """Everything attacks/ imports, transitively, stays below the engine: clients.toml's reader
    (sim.engine.clientside), the ground truth and the scorer are out of an attack's reach."""
    reach, todo = set(), [m for m in MODULES if m == "attacks" or m.startswith("attacks.")]
    while todo:
        m = todo.pop()
        if m in reach:
            continue
        reach.add(m)
        todo += [t for t, _, _, _ in imports(m, MODULES[m])[0] if t in MODULES]
        parent = m.rsplit(".", 1)[0]
        if parent != m and parent in MODULES:  # importing a.b runs a/__init__.py too
            todo.append(parent)
    assert {"attacks.base", "strategies.base", "sim.core.splits"} <= reach  # the closure is real
    assert not [m for m in reach if m.startswith("sim.engine") or m.startswith("sim.commands")]
