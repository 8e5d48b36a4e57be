"""The package's structure, checked on its source: no import cycle (top-level and function-level imports alike);
library code never imports the developer tools (``vivit_kernels/tools``); one name per thing (no alias module, no
name re-exported from another module, no file name twice); the op registry is the only list of ops and every per-op
test and benchmark is parametrised from it; ``ops/formulas.py`` is the only home of FLOP formulas and
``vivit_kernels.testing`` of the tolerance rule; no module outside ``ops/`` grows past 500 lines; every op module is
reachable from the registry. (That the command line's parser imports no torch: tests/test_cli.py; the public API:
tests/test_public_api.py.) Each check is shown able to fail on a made-up example."""

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


def _tools_importers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Library modules (not tools/, not the command line) that import tools/."""
    tools = "vivit_kernels.tools"
    return {name: {m for m in deps if m == tools or m.startswith(tools + ".")} for name, deps in graph.items()
            if not (name == tools or name.startswith(tools + ".")) and name != "vivit_kernels.cli"
            and any(m == tools or m.startswith(tools + ".") for m in deps)}


def test_library_code_never_imports_the_tools():
    assert _tools_importers(_graph()) == {}
    made_up = {"vivit_kernels.model": {"vivit_kernels.tools.measure"}, "vivit_kernels.tools.measure": set()}
    assert _tools_importers(made_up) != {}


# ------------------------------------------------------------------------------------------------
# One name per thing: no alias module, no re-exported name, no file name twice
# ------------------------------------------------------------------------------------------------
# modules whose job is to gather names defined elsewhere: the package's lazy public API and the functional API
GATHERERS = {"vivit_kernels/__init__.py", "vivit_kernels/functional.py"}


def aliases_and_reexports(path: Path) -> list[str]:
    """An alias (a module that makes its own name another module's), and the names in ``__all__`` that the module
    imports rather than defines (a second home for a name). A package's ``__init__`` may gather its own modules'."""
    text = path.read_text(encoding="utf-8")
    found = ["alias of another module"] if "sys.modules[__name__] = " in text else []
    tree = ast.parse(text)
    defined, exported = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                exported = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.ImportFrom) and path.name == "__init__.py" and node.level == 1:
            defined.update(a.asname or a.name for a in node.names)  # the package's own modules' names
    return found + [f"re-exports {name}" for name in exported if name not in defined]


def test_no_alias_module_and_no_name_with_two_homes():
    found = {str(p.relative_to(ROOT)): aliases_and_reexports(p) for p in PACKAGE.rglob("*.py")
             if str(p.relative_to(ROOT)) not in GATHERERS}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_alias_check_can_fail(tmp_path):
    alias = tmp_path / "old.py"
    alias.write_text("import sys\nfrom .new import thing as _m\nsys.modules[__name__] = _m\n")
    reexport = tmp_path / "mod.py"
    reexport.write_text("from .video import read_clips\n__all__ = ['read_clips', 'f']\ndef f():\n    pass\n")
    assert aliases_and_reexports(alias) == ["alias of another module"]
    assert aliases_and_reexports(reexport) == ["re-exports read_clips"]


def test_no_file_name_twice_in_the_package():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []


# ------------------------------------------------------------------------------------------------
# One source per fact: op lists and FLOP formulas only in the registry, the tolerance rule only in testing.py
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# One source per fact: op lists only in the registry, FLOP formulas only in ops/formulas.py, the tolerance rule only
# in testing.py
# ------------------------------------------------------------------------------------------------
REGISTRY = PACKAGE / "ops" / "registry.py"
FORMULAS = PACKAGE / "ops" / "formulas.py"
TESTING = PACKAGE / "testing.py"
PUBLIC_API_PIN = ROOT / "tests" / "test_public_api.py"  # pins the registry's names: it must restate them


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


_RULE = re.compile(r"1e-4 \* max\(1(\.0)?,|\bjudge\([^)]*\b3\.0\b|get_float32_matmul_precision\(\)[^#]*\b1e-\d\b|"
                   r"fp32_atol\s*=\s*[\d.e-]+\s+if\b")


def tolerance_rules(text: str) -> list[int]:
    """Lines that write the tolerance rule out again: its gradient slack, a 3x judgement of a gradient, an fp32
    tolerance chosen by the matmul precision, or a second rule for low precision (an fp32 tolerance picked by dtype)."""
    return [i for i, line in enumerate(text.splitlines(), 1) if _RULE.search(line)]


def test_the_registry_is_the_only_op_list_and_formulas_the_only_home_of_flop_formulas():
    names = _op_names()
    lists, formulas = {}, {}
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = str(path.relative_to(ROOT))
        if path not in (REGISTRY, PUBLIC_API_PIN) and op_lists(tree, names):
            lists[rel] = op_lists(tree, names)
        if path != FORMULAS and flop_formulas(tree):
            formulas[rel] = flop_formulas(tree)
    assert lists == {}, "op lists outside vivit_kernels/ops/registry.py (read OPS / backend_ops() instead)"
    assert formulas == {}, "FLOP formulas outside vivit_kernels/ops/formulas.py (use an entry's cost)"
    assert flop_formulas(ast.parse(FORMULAS.read_text(encoding="utf-8")))  # the formulas themselves are seen


def test_testing_is_the_only_tolerance_rule():
    found = {str(p.relative_to(ROOT)): tolerance_rules(p.read_text(encoding="utf-8")) for p in _sources()
             if p not in (TESTING, Path(__file__).resolve())}  # this file holds made-up examples
    assert {k: v for k, v in found.items() if v} == {}, "use vivit_kernels.testing (judge_outputs, grad_eps, fp32_atol)"
    assert tolerance_rules(TESTING.read_text(encoding="utf-8"))  # the rule itself is seen


@pytest.mark.parametrize("source, check", [
    ('OPS = ("layer_norm", "mlp", "linear")', "lists"),
    ('def f(op):\n    if op == "qkv":\n        pass\n    elif op == "mlp":\n        pass\n    elif op == "linear":\n'
     '        pass', "lists"),
    ("flops = 2 * m * n * k", "formulas"),
    ("flops = 4.0 * batch * heads * tokens * tokens * head_dim", "formulas"),
    ("eps = 1e-4 * max(1.0, ref.abs().max().item())", "rules"),
    ('atol = 1e-2 if torch.get_float32_matmul_precision() != "highest" else 1e-4', "rules"),
    ("judge(name, got, want, fp32_atol=1e-5 if dtype == 'fp32' else 1e-2)", "rules"),
])
def test_the_source_checks_can_fail(source, check):
    if check == "lists":
        assert op_lists(ast.parse(source), _op_names())
    elif check == "formulas":
        assert flop_formulas(ast.parse(source))
    else:
        assert tolerance_rules(source)


# ------------------------------------------------------------------------------------------------
# The per-op tests and benchmarks are parametrised from the registry: positively, every op (each variant, and where
# it matters each implementation) is among a registry-driven test's collected cases, and those cases are read from
# the registry, not written out
# ------------------------------------------------------------------------------------------------
def _triton_ops(OPS) -> list[str]:
    return [op for op, e in OPS.items() if not e.kernel_module.startswith("csrc/")]


def _gemm_ops(OPS) -> list[str]:
    return [op for op, e in OPS.items() if e.kernel_module == "vivit_kernels.ops._gemm"]


# test -> (which ops it must cover, whether each implementation too); read by _expected_cases
REGISTRY_DRIVEN = {
    "bench/test_bench_ops.py::test_op": (lambda OPS, backend: list(OPS), True),
    "tests/test_choose.py::test_every_candidate_equals_the_reference": (lambda OPS, backend: list(OPS), True),
    "tests/test_cuda.py::test_op_vivit_b": (lambda OPS, backend: _triton_ops(OPS), False),
    "tests/test_frozen_weights.py::test_frozen_weights_get_no_gradient_and_cost_nothing":
        (lambda OPS, backend: [op for op in backend if OPS[op].weights], False),
    "tests/test_linear.py::test_ops_on_the_tma_path": (lambda OPS, backend: _gemm_ops(OPS), False),
}


def _collected(tests: list[str]) -> list[str]:
    """The ids pytest collects for ``tests`` (file::function), in a fresh process (the suite's own conftest)."""
    import subprocess
    import sys

    files = sorted({t.split("::")[0] for t in tests})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


def missing_cases(test: str, ids: list[str], ops: list[str], each_implementation: bool) -> list[str]:
    """The (op, variant[, implementation]) of ``ops`` that no collected case of ``test`` names (its id's parts)."""
    from vivit_kernels.ops.registry import OPS

    cases = [set(i.split("[", 1)[1].rstrip("]").split("-")) for i in ids if i.split("[")[0] == test and "[" in i]
    missing = []
    for op in ops:
        for variant in OPS[op].variants:
            names = OPS[op].implementations if each_implementation else [None]
            for name in names:
                want = {op} | ({variant} if variant else set()) | ({name} if name else set())
                # a variant's own dashes split it: compare against the id's parts as a set
                want = {part for w in want for part in w.split("-")}
                if not any(want <= case for case in cases):
                    missing.append(" ".join(str(w) for w in (op, variant, name) if w))
    return missing


def _parametrised_from_registry(path: Path, function: str) -> bool:
    """Whether ``function``'s parametrize values are computed from the registry: the expression, or a module-level
    function it calls, reads ``OPS`` or ``backend_ops``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def reads_registry(node: ast.AST, depth: int = 0) -> bool:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in ("OPS", "backend_ops"):
                return True
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in helpers and depth < 3:
                if reads_registry(helpers[n.func.id], depth + 1):
                    return True
        return False

    fn = helpers[function]
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize" and len(deco.args) > 1:
            if reads_registry(deco.args[1]):
                return True
    return False


def test_every_per_op_test_and_benchmark_is_parametrised_from_the_registry():
    from vivit_kernels.ops.registry import OPS, backend_ops

    ids = _collected(list(REGISTRY_DRIVEN))
    gaps = {}
    for test, (which, each_implementation) in REGISTRY_DRIVEN.items():
        path, function = test.split("::")
        assert _parametrised_from_registry(ROOT / path, function), f"{test}: its cases are written out, not read"
        missing = missing_cases(test, ids, which(OPS, backend_ops()), each_implementation)
        if missing:
            gaps[test] = missing
    assert gaps == {}, "ops of the registry no per-op test or benchmark runs"


def test_the_registry_driven_checks_can_fail(tmp_path):
    written = tmp_path / "test_x.py"
    written.write_text("import pytest\n@pytest.mark.parametrize('op', ['linear', 'mlp'])\ndef test_x(op):\n    pass\n")
    assert not _parametrised_from_registry(written, "test_x")
    ids = ["tests/test_x.py::test_x[mlp-triton-B1]"]
    assert missing_cases("tests/test_x.py::test_x", ids, ["mlp", "layer_norm"], False) == ["layer_norm"]
    assert missing_cases("tests/test_x.py::test_x", ids, ["mlp"], True) == ["mlp cublas", "mlp cublas+ext"]


def test_no_module_outside_ops_is_larger_than_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
             if "ops" not in p.relative_to(PACKAGE).parts}
    assert {k: n for k, n in sizes.items() if n >= 500} == {}


def test_every_op_module_is_in_the_registry():
    from vivit_kernels.ops.registry import OPS, aot_modules

    modules = {op.module for op in OPS.values()}
    # the ops package's shared modules: the table, its formulas and inputs, activations
    shared = ("registry", "formulas", "sample_inputs", "activations", "token_sets")
    op_files = {f"vivit_kernels.ops.{p.stem}" for p in (PACKAGE / "ops").glob("*.py")
                if not p.stem.startswith("_") and p.stem not in shared}
    assert modules == op_files
    kernels = {op.kernel_module for op in OPS.values() if op.kernel_module.startswith("vivit_kernels.")}
    assert set(aot_modules()) == kernels  # every Triton kernel module is in the compile gate
