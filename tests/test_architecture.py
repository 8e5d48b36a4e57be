"""The package's structure, checked on its source: no import cycle (top-level and function-level imports alike);
library code never imports the developer tools (``vivit_kernels/tools``); the op registry is the only list of ops
and the only home of FLOP formulas, ``vivit_kernels.testing`` the only tolerance rule; no module outside ``ops/``
grows past 500 lines; every op module is reachable from the registry. (That the command line's parser imports
no torch: tests/test_cli.py; that every public import path still works: tests/test_public_api.py.) Each check is
shown able to fail on a made-up example."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vivit_kernels"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _is_alias(path: Path) -> bool:
    """A module kept at an old import path, which only makes that name the module it moved to."""
    return "sys.modules[__name__] = " in path.read_text(encoding="utf-8")


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports, at any depth of its code (TYPE_CHECKING blocks aside)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names if a.name in mods)

        def visit_ImportFrom(self, node):
            base = node.module or ""
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                base = f"{base}.{node.module}" if node.module else base
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_the_package():
    graph = _graph()
    assert graph["vivit_kernels.auto.choose"] >= {"vivit_kernels.ops.registry"}  # the scan sees imports
    assert "vivit_kernels.model" not in graph["vivit_kernels.auto.choose"]
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def _tools_importers(graph: dict[str, set[str]], mods: dict[str, Path]) -> dict[str, set[str]]:
    """Library modules (not tools/, not the command line, not an alias of an old path) that import tools/."""
    tools = "vivit_kernels.tools"
    return {name: {m for m in deps if m == tools or m.startswith(tools + ".")} for name, deps in graph.items()
            if not (name == tools or name.startswith(tools + ".")) and name != "vivit_kernels.cli"
            and not _is_alias(mods[name]) and any(m == tools or m.startswith(tools + ".") for m in deps)}


def test_library_code_never_imports_the_tools():
    mods = _modules()
    assert _tools_importers(_graph(), mods) == {}
    made_up = {"vivit_kernels.model": {"vivit_kernels.tools.measure"}, "vivit_kernels.tools.measure": set()}
    assert _tools_importers(made_up, {"vivit_kernels.model": PACKAGE / "model.py",
                                      "vivit_kernels.tools.measure": PACKAGE / "tools" / "measure.py"}) != {}


# ------------------------------------------------------------------------------------------------
# One source per fact: op lists and FLOP formulas only in the registry, the tolerance rule only in testing.py
# ------------------------------------------------------------------------------------------------
REGISTRY = PACKAGE / "ops" / "registry.py"
TESTING = PACKAGE / "testing.py"


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")])


def _op_names() -> set[str]:
    from vivit_kernels.ops.registry import OPS

    return set(OPS)


def op_lists(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of literals (tuples, lists, sets, dict keys) naming three or more ops, and of functions comparing a
    value with three or more op names (an if-chain over ops). ``__all__`` lists functions, not ops."""
    found = []
    exported = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)}
    for node in ast.walk(tree):
        if id(node) in exported:
            continue
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
            node.keys if isinstance(node, ast.Dict) else None
        if items is not None:
            named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
            if len(named) >= 3:
                found.append(node.lineno)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            compared = {c.value for n in ast.walk(node) if isinstance(n, ast.Compare)
                        for c in (n.left, *n.comparators) if isinstance(c, ast.Constant) and c.value in names}
            if len(compared) >= 3:
                found.append(node.lineno)
    return found


def _factors(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _factors(node.left) + _factors(node.right)
    return [node]


def flop_formulas(tree: ast.AST) -> list[int]:
    """Lines of products of a 2 or a 4 (a multiply-add, attention's two matmuls) with three or more sizes, like
    ``2 * m * n * k``, and of FLOP formulas given to torch's counter."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            factors = _factors(node)
            constants = [f.value for f in factors if isinstance(f, ast.Constant)]
            sizes = [f for f in factors if not isinstance(f, ast.Constant)]
            if any(c in (2, 4, 2.0, 4.0) for c in constants) and len(sizes) >= 3:
                found.append(node.lineno)
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                "register_flop_formula":
            found.append(node.lineno)
    return sorted(set(found))


_RULE = re.compile(r"1e-4 \* max\(1(\.0)?,|\bjudge\([^)]*\b3\.0\b")


def tolerance_rules(text: str) -> list[int]:
    """Lines that write the tolerance rule out again (its gradient slack, or a 3x judgement of a gradient)."""
    return [i for i, line in enumerate(text.splitlines(), 1) if _RULE.search(line)]


def test_the_registry_is_the_only_op_list_and_home_of_flop_formulas():
    names = _op_names()
    lists, formulas = {}, {}
    for path in _sources():
        if path == REGISTRY:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = str(path.relative_to(ROOT))
        if op_lists(tree, names):
            lists[rel] = op_lists(tree, names)
        if flop_formulas(tree):
            formulas[rel] = flop_formulas(tree)
    assert lists == {}, "op lists outside vivit_kernels/ops/registry.py (read OPS / backend_ops() instead)"
    assert formulas == {}, "FLOP formulas outside vivit_kernels/ops/registry.py (use an entry's flops)"
    assert flop_formulas(ast.parse(REGISTRY.read_text(encoding="utf-8")))  # the registry's own are seen


def test_testing_is_the_only_tolerance_rule():
    found = {str(p.relative_to(ROOT)): tolerance_rules(p.read_text(encoding="utf-8")) for p in _sources()
             if p not in (TESTING, Path(__file__).resolve())}  # this file holds a made-up example
    assert {k: v for k, v in found.items() if v} == {}, "use vivit_kernels.testing (judge_outputs, grad_eps)"
    assert tolerance_rules(TESTING.read_text(encoding="utf-8"))  # the rule itself is seen


@pytest.mark.parametrize("source, check", [
    ('OPS = ("layer_norm", "mlp", "linear")', "lists"),
    ('def f(op):\n    if op == "qkv":\n        pass\n    elif op == "mlp":\n        pass\n    elif op == "linear":\n'
     '        pass', "lists"),
    ("flops = 2 * m * n * k", "formulas"),
    ("flops = 4.0 * batch * heads * tokens * tokens * head_dim", "formulas"),
    ("eps = 1e-4 * max(1.0, ref.abs().max().item())", "rules"),
])
def test_the_source_checks_can_fail(source, check):
    if check == "lists":
        assert op_lists(ast.parse(source), _op_names())
    elif check == "formulas":
        assert flop_formulas(ast.parse(source))
    else:
        assert tolerance_rules(source)


def test_no_module_outside_ops_is_larger_than_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
             if "ops" not in p.relative_to(PACKAGE).parts}
    assert {k: n for k, n in sizes.items() if n >= 500} == {}


def test_every_op_module_is_in_the_registry():
    from vivit_kernels.ops.registry import OPS, aot_modules

    modules = {op.module for op in OPS.values()}
    op_files = {f"vivit_kernels.ops.{p.stem}" for p in (PACKAGE / "ops").glob("*.py")
                if not p.stem.startswith("_") and p.stem not in ("registry", "activations")}
    assert modules == op_files
    kernels = {op.kernel_module for op in OPS.values() if op.kernel_module.startswith("vivit_kernels.")}
    assert set(aot_modules()) == kernels  # every Triton kernel module is in the compile gate
