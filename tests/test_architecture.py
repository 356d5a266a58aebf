"""The package's imports point down the floors of docs/architecture.md, form no cycle, and a function-level
import says why it is one.

Every ``import`` and ``from ... import`` of an imgcls module is read with ``ast``, at module level and inside
functions alike.  A module's floor is the first entry of FLOORS that names it or a package above it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom first.  A module may import its own floor and the floors below it, never a floor above.
FLOORS = [
    ("errors", "io", "plots", "startup", "tensorfile", "terminal"),
    ("config", "recipes"),
    ("data", "models"),
    ("auto", "checkpoint", "ood", "rundir"),
    ("inference", "predictor"),
    ("evaluation",),
    ("training",),
    ("explain",),
    ("reports",),
    ("analysis", "export", "inspection", "quantize", "tracking", "tuning"),
    ("driver", "update"),
    ("api",),
    ("serving",),
    ("cli", "__main__"),
]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool
    reason: str  # the comment on the import's line, or on the line above its block of imports


def floor(module: str) -> int:
    """The floor of ``imgcls.x.y``: that of the longest FLOORS name that is it or a package above it."""
    rel = module.removeprefix("imgcls").lstrip(".")
    best, length = None, -1
    for i, names in enumerate(FLOORS):
        for name in names:
            if (rel == name or rel.startswith(name + ".")) and len(name) > length:
                best, length = i, len(name)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS here and to docs/architecture.md")
    return best


def scan(src: Path) -> tuple[dict[str, Path], list[Import]]:
    """The modules of the imgcls package under ``src``, and every import of one of them by another."""
    modules = {}
    for path in (src / "imgcls").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = []
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for body, in_function in _bodies(tree):
            block_start = None  # the first statement of the run of imports the current one belongs to
            for node in body:
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    block_start = None
                    continue
                block_start = block_start or node
                for target in _targets(node, modules):
                    if target != module:
                        found.append(Import(module, target, node.lineno, in_function,
                                            _reason(lines, node, block_start)))
    return modules, found


def _bodies(node: ast.AST, in_function: bool = False):
    """(statement list, inside a function) for ``node``'s blocks and every block nested in them."""
    for field in ("body", "orelse", "finalbody"):
        body = getattr(node, field, None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            yield body, in_function
    for child in ast.iter_child_nodes(node):
        yield from _bodies(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.module and node.level == 0:
        subs = [f"{node.module}.{alias.name}" for alias in node.names]
        names = [s for s in subs if s in modules] or [node.module]
    else:
        return []
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _reason(lines: list[str], node: ast.stmt, block_start: ast.stmt) -> str:
    own = lines[node.lineno - 1]
    if "#" in own:
        return own.split("#", 1)[1].strip()
    above = lines[block_start.lineno - 2].strip() if block_start.lineno >= 2 else ""
    return above[1:].strip() if above.startswith("#") else ""


def upward(imports: list[Import]) -> list[str]:
    return [f"{i.importer} (floor {floor(i.importer)}) imports {i.imported} (floor {floor(i.imported)}), "
            f"line {i.line}" for i in imports if "imgcls" not in (i.importer, i.imported)
            and floor(i.imported) > floor(i.importer)]


def cycles(imports: list[Import]) -> list[list[str]]:
    graph = defaultdict(set)
    for i in imports:
        if "imgcls" not in (i.importer, i.imported):
            graph[i.importer].add(i.imported)
    found, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


MODULES, IMPORTS = scan(SRC)


def test_every_module_is_on_a_floor():
    for module in MODULES:
        if module != "imgcls":
            floor(module)


def test_no_import_points_up_a_floor():
    assert not upward(IMPORTS), "imports that point up:\n" + "\n".join(upward(IMPORTS))


def test_no_cycle():
    assert not cycles(IMPORTS), f"import cycles: {cycles(IMPORTS)}"


def test_the_package_root_is_the_face_of_the_top_floor_and_a_version_to_the_rest():
    # imgcls/__init__.py stays cheap: it imports nothing at module level, and its train() and load() reach
    # imgcls.api by name when called.  Below the CLI a module imports the root for __version__ alone.
    assert not [i for i in IMPORTS if i.importer == "imgcls" and not i.in_function]
    top = len(FLOORS) - 1
    for i in IMPORTS:
        if i.imported == "imgcls" and floor(i.importer) != top:
            tree = ast.parse(MODULES[i.importer].read_text())
            uses = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name) and node.value.id == "imgcls"}
            named = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "imgcls" for alias in node.names}
            assert uses | (named & {"__version__", "train", "load"}) <= {"__version__"}, (i, uses, named)


def test_evaluation_draws_no_figure():
    # evaluation/ computes numbers; their figures live in reports/ (docs/architecture.md, floor 5).
    evaluation = {m: path for m, path in MODULES.items() if (m + ".").startswith("imgcls.evaluation.")}
    plotting = [f"{i.importer} imports {i.imported}, line {i.line}" for i in IMPORTS
                if i.importer in evaluation and i.imported == "imgcls.plots"]
    for module, path in evaluation.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            plotting += [f"{module} imports {name}, line {node.lineno}" for name in names
                         if name.split(".")[0] == "matplotlib"]
    assert not plotting, "evaluation/ modules that draw (move the figure to reports/):\n" + "\n".join(plotting)


def test_every_function_level_import_says_why():
    silent = sorted({f"{MODULES[i.importer].relative_to(SRC)}:{i.line} imports {i.imported}"
                     for i in IMPORTS if i.in_function and not i.reason})
    assert not silent, "function-level imports without a reason comment:\n" + "\n".join(silent)


def test_the_checks_catch_an_upward_import_a_cycle_and_a_silent_function_level_import(tmp_path):
    pkg = tmp_path / "imgcls"
    (pkg / "evaluation").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation" / "__init__.py").write_text("")
    (pkg / "evaluation" / "metrics.py").write_text("def f():\n    from imgcls.api import load\n")
    (pkg / "api.py").write_text("from imgcls.evaluation import metrics\n")
    _, imports = scan(tmp_path)
    assert upward(imports) == ["imgcls.evaluation.metrics (floor 5) imports imgcls.api (floor 11), line 2"]
    assert cycles(imports) == [["imgcls.api", "imgcls.evaluation.metrics"]]
    assert [(i.importer, i.in_function, i.reason) for i in imports if i.importer.endswith("metrics")] == [
        ("imgcls.evaluation.metrics", True, "")]
    (pkg / "evaluation" / "metrics.py").write_text(
        "def f():\n    # start-up time: api imports torch\n    from imgcls.api import load\n    x = 1\n")
    assert [i.reason for i in scan(tmp_path)[1] if i.importer.endswith("metrics")] == ["start-up time: api imports torch"]


def test_the_trainer_reads_as_one_process_and_data_parallelism_has_one_seam():
    # training/trainer.py is handed its strategy (training/strategy.py); it never imports torch.distributed or
    # imgcls.training.distributed, and no name in it is a rank.
    path = SRC / "imgcls" / "training" / "trainer.py"
    tree = ast.parse(path.read_text())
    imported = {alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not [m for m in imported if "distributed" in m], imported
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} | {
        node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    assert not [n for n in names if "rank" in n.lower()], names
    assert "torch.distributed" not in (SRC / "imgcls" / "training" / "strategy.py").read_text().split('"""', 2)[2]
