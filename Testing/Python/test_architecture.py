"""Checks that keep the layout of SpineNetLib honest (the rules are in docs/ARCHITECTURE.md).

Every check reads the source with ``ast`` or plain text; nothing from SpineNetLib is imported, so
these tests need neither torch nor Slicer and run in well under a second.

* (a) the import graph of the library has no cycle;
* (b) no library file over 800 lines, no function over 100 lines;
* (c) only ``SpineNetLib/slicer/mrml.py`` imports slicer, vtk or Qt;
* (d) inference code never imports training/, evaluation/ or synthetic/ (one narrow exception in
  the command line, see ``CLI_TOOL_IMPORTS``), and every import between packages is one the
  table of docs/ARCHITECTURE.md allows;
* (e) no public top-level function or class name is defined in two library modules (a short
  allow-list);
* (f) every ``official §N`` citation resolves to docs/OFFICIAL_IMPLEMENTATION.md and every
  ``paper §N`` citation to a row of the paper table in docs/ARCHITECTURE.md;
* (g) tests never ``importorskip`` SpineNetLib's own modules (a broken import must fail, not skip).

Imports are collected at every depth (module level, functions, methods; absolute and relative),
except inside ``if TYPE_CHECKING:`` blocks, which never run. Each failure message names the
offending files, lines and names.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "SpineNetLib"
DOCS = ROOT / "docs"

MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 100

#: Sub-packages (and top-level modules) that run when a scan is read, i.e. everything except
#: training/, evaluation/ and synthetic/.
INFERENCE = ("core", "inputs", "detect", "label", "discs", "models", "weights", "outputs",
             "apps", "cohort", "slicer", "pipeline", "__init__", "__main__")
TOOLING = ("training", "evaluation", "synthetic")

#: The only imports of tooling packages allowed in inference code: ``spinenet train``,
#: ``spinenet demo`` and ``spinenet evaluate`` are sub-commands of the one ``spinenet`` program,
#: so apps/cli.py reaches the tooling, but only from inside the function that serves that
#: sub-command (never at module level, so ``spinenet run`` and the Slicer worker do not load it).
#: Keys are (importing module, enclosing top-level function, allowed target module), values why.
CLI_TOOL_IMPORTS = {
    ("SpineNetLib.apps.cli", "build_parser", "SpineNetLib.training.cli"): "registers `spinenet train`",
    ("SpineNetLib.apps.cli", "command_demo", "SpineNetLib.synthetic.phantom"): "`spinenet demo` makes a phantom",
    ("SpineNetLib.apps.cli", "command_demo", "SpineNetLib.evaluation.demo_check"):
        "`spinenet demo` checks its result against the phantom's ground truth",
    ("SpineNetLib.apps.cli", "command_evaluate", "SpineNetLib.evaluation.evaluate"): "`spinenet evaluate`",
    ("SpineNetLib.apps.cli", "command_evaluate", "SpineNetLib.evaluation.tables"): "`spinenet evaluate` prints its tables",
}

#: Public top-level names that may be defined in more than one library module, with the reason.
ALLOWED_DUPLICATES = {
    # Each program (`spinenet`, `python -m SpineNetLib.apps.worker`) has its own entry point and
    # its own argument parser; the conventional names are clearer than unique ones.
    "main": {"SpineNetLib.apps.cli", "SpineNetLib.apps.worker"},
    "build_parser": {"SpineNetLib.apps.cli", "SpineNetLib.apps.worker"},
}

#: Top-level import names of Slicer, VTK and Qt (Slicer's PythonQt and the Qt bindings for Python).
SLICER_OR_QT = {"slicer", "vtk", "vtkmodules", "mrml", "vtkSlicer", "qt", "ctk", "PythonQt",
                "PySide2", "PySide6", "PyQt5", "PyQt6", "shiboken2", "shiboken6"}
SLICER_MODULE = "SpineNetLib.slicer.mrml"


# ----------------------------------------------------------------------------- the library


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def library_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of SpineNetLib."""
    return {_module_name(p): p for p in sorted(LIB.rglob("*.py"))}


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Import:
    source: str          # importing module
    target: str          # imported module (a library module when it is one, else the raw name)
    lineno: int
    function: str | None  # enclosing top-level function/class, None for module level

    @property
    def where(self) -> str:
        scope = f" (in {self.function})" if self.function else ""
        return f"{_rel(library_modules()[self.source])}:{self.lineno}{scope}"


def _resolve(name: str, modules) -> str:
    """The library module a dotted name refers to: the name itself or its longest module prefix."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return name


def _base_package(module: str, path: Path, level: int) -> str:
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]          # a plain module's package
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``: a block that never runs."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_in(node: ast.AST, module: str, path: Path, function: str | None, out: list) -> None:
    """Collect the imports under ``node``, at any depth, except those of ``if TYPE_CHECKING:`` blocks
    (annotation-only: they are never executed, so they are no dependency)."""
    modules = library_modules()
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for other in child.orelse:
                _imports_in(ast.Module(body=[other], type_ignores=[]), module, path, function, out)
            continue
        scope = function
        if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = child.name
        if isinstance(child, ast.Import):
            for alias in child.names:
                out.append(Import(module, _resolve(alias.name, modules), child.lineno, function))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = _base_package(module, path, child.level)
                base = f"{package}.{base}" if base else package
            for alias in child.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _resolve(base, modules)
                out.append(Import(module, target, child.lineno, function))
        _imports_in(child, module, path, scope, out)


@lru_cache(maxsize=None)
def all_imports() -> tuple[Import, ...]:
    """Every import statement of the library: module level, in functions, in methods, relative ones."""
    out: list[Import] = []
    for module, path in library_modules().items():
        _imports_in(_tree(path), module, path, None, out)
    return tuple(out)


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


# ----------------------------------------------------------------------------- (a) no cycle


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return component  # unreachable for a real component


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], Import]]:
    modules = library_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    first: dict[tuple[str, str], Import] = {}
    for imp in all_imports():
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            first.setdefault((imp.source, imp.target), imp)
    return graph, first


def test_import_graph_has_no_cycle():
    """Module-level and function-level imports both count: a lazy import only hides a cycle.

    Parent packages are not counted as imported (``import SpineNetLib.a.b`` gives an edge to
    ``SpineNetLib.a.b`` only), otherwise every package __init__ that re-exports would be a cycle.
    """
    graph, first = import_graph()
    reports = []
    for component in _strongly_connected(graph):
        cycle = _one_cycle(graph, component)
        steps = [f"    {a} -> {b}   [{first[(a, b)].where}]" for a, b in zip(cycle, cycle[1:])]
        inside = [f"    {a} -> {b}   [{first[(a, b)].where}]" for a in component
                  for b in sorted(graph[a] & set(component)) if (a, b) not in set(zip(cycle, cycle[1:]))]
        reports.append(f"  cycle among {len(component)} modules ({', '.join(component)}):\n" + "\n".join(steps)
                       + ("\n  other imports inside that group:\n" + "\n".join(inside) if inside else ""))
    assert not reports, "import cycles in SpineNetLib:\n" + "\n".join(reports)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    (component,) = _strongly_connected(graph)
    assert component == ["a", "b", "c"]
    assert _one_cycle(graph, component) == ["a", "b", "c", "a"]


def test_graph_sees_function_level_and_relative_imports():
    source = ("import os\nfrom . import sibling\nfrom .. import core\n"
              "def f():\n    from SpineNetLib.core.scan import Scan\n    import SpineNetLib.core.levels as lv\n"
              "if TYPE_CHECKING:\n    from SpineNetLib.pipeline import RunResult\n")
    path = LIB / "detect" / "probe.py"      # never written: only the name matters for resolution
    out: list[Import] = []
    _imports_in(ast.parse(source), "SpineNetLib.detect.probe", path, None, out)
    targets = {(i.target, i.function) for i in out}
    assert ("SpineNetLib.core.scan", "f") in targets
    assert ("SpineNetLib.core.levels", "f") in targets
    assert ("SpineNetLib.core", None) in targets
    assert any(t.startswith("SpineNetLib.detect") and f is None for t, f in targets)
    assert not any(t == "SpineNetLib.pipeline" for t, f in targets)  # annotation-only import


# ----------------------------------------------------------------------------- (b) sizes


def test_no_library_file_over_800_lines():
    long = []
    for module, path in library_modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            long.append(f"  {_rel(path)}: {n} lines")
    assert not long, f"library files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_100_lines():
    long = []
    for module, path in library_modules().items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"  {_rel(path)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(sorted(long))


# ----------------------------------------------------------------------------- (c) Slicer


def test_only_mrml_imports_slicer_vtk_or_qt():
    offenders = [f"  {imp.where}: imports {imp.target}" for imp in all_imports()
                 if imp.target.split(".")[0] in SLICER_OR_QT and imp.source != SLICER_MODULE]
    assert not offenders, f"only {SLICER_MODULE} may import slicer/vtk/qt:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------- (d) layering


def test_inference_code_never_imports_training_evaluation_or_synthetic():
    offenders = []
    for imp in all_imports():
        if _package_of(imp.source) not in INFERENCE:
            continue
        parts = imp.target.split(".")
        if parts[0] != "SpineNetLib" or len(parts) < 2 or parts[1] not in TOOLING:
            continue
        if imp.function is not None and (imp.source, imp.function, imp.target) in CLI_TOOL_IMPORTS:
            continue
        offenders.append(f"  {imp.where}: imports {imp.target}")
    assert not offenders, ("inference code imports training/evaluation/synthetic "
                           "(only the CLI_TOOL_IMPORTS of apps/cli.py are allowed):\n" + "\n".join(offenders))


def test_the_cli_exceptions_still_exist():
    """An exception that no longer matches an import is stale: drop it from CLI_TOOL_IMPORTS."""
    seen = {(i.source, i.function, i.target) for i in all_imports()}
    stale = [key for key in CLI_TOOL_IMPORTS if key not in seen]
    assert not stale, f"unused entries in CLI_TOOL_IMPORTS: {stale}"


def documented_layers() -> dict[str, set[str]]:
    """Package -> packages it may import, from the table of docs/ARCHITECTURE.md.

    Rows look like ``| `discs/` | what it holds | `core`, `models` |`` (``—`` for nothing).
    """
    layers = {}
    for cells in _table_rows(DOCS / "ARCHITECTURE.md"):
        m = re.fullmatch(r"`(\w+)(?:/|\.py)`", cells[0])
        if m and len(cells) >= 3:
            layers[m.group(1)] = set(re.findall(r"`(\w+)`", cells[-1]))
    return layers


def test_imports_follow_the_documented_layers():
    """Every import between two packages is allowed by the table in docs/ARCHITECTURE.md."""
    layers = documented_layers()
    units = {_package_of(m) for m in library_modules()}
    undocumented = sorted(units - set(layers))
    assert not undocumented, f"packages without a row in the docs/ARCHITECTURE.md table: {undocumented}"
    offenders = []
    for imp in all_imports():
        if not imp.target.startswith("SpineNetLib") or imp.target == "SpineNetLib":
            continue
        source, target = _package_of(imp.source), _package_of(imp.target)
        if source == target or target in layers[source]:
            continue
        if imp.function is not None and (imp.source, imp.function, imp.target) in CLI_TOOL_IMPORTS:
            continue
        offenders.append(f"  {imp.where}: {source} imports {imp.target}")
    assert not offenders, ("imports that docs/ARCHITECTURE.md does not allow "
                           "(change the code, or the table if the rule should change):\n"
                           + "\n".join(sorted(set(offenders))))


# ----------------------------------------------------------------------------- (e) duplicates


def top_level_definitions() -> dict[str, set[str]]:
    """Public name -> modules that define it as a top-level function or class.

    Private helpers (``_name``) are left out: they are not importable API, so two modules'
    ``_conv`` cannot be confused by a caller.
    """
    names: dict[str, set[str]] = {}
    for module, path in library_modules().items():
        for node in _tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and not node.name.startswith("_"):
                names.setdefault(node.name, set()).add(module)
    return names


def test_no_name_defined_in_two_library_modules():
    duplicates = []
    for name, modules in sorted(top_level_definitions().items()):
        if len(modules) < 2 or modules <= ALLOWED_DUPLICATES.get(name, set()):
            continue
        duplicates.append(f"  {name}: {', '.join(sorted(modules))}")
    assert not duplicates, ("names defined in more than one library module "
                            "(rename, share one definition, or add a reasoned entry to ALLOWED_DUPLICATES):\n"
                            + "\n".join(duplicates))


def test_allowed_duplicates_are_still_duplicates():
    names = top_level_definitions()
    stale = [n for n, modules in ALLOWED_DUPLICATES.items() if len(names.get(n, set()) & modules) < 2]
    assert not stale, f"ALLOWED_DUPLICATES entries that are no longer duplicated: {stale}"


# ----------------------------------------------------------------------------- (f) citations

# "official §5.4", "official §3.2-3.3", "official §3.4, §7", "paper §4.4.1"; a sentence's full stop
# after the number is not part of it.
_CITATION = re.compile(r"\b(official|paper)\s+§(\d+(?:\.\d+)*)"     # kind, first number
                       r"((?:\s*[-–]\s*\d+(?:\.\d+)*)?)"              # optional end of a range
                       r"((?:,\s*§\d+(?:\.\d+)*)*)")                  # optional ", §7" list
_MORE = re.compile(r"§(\d+(?:\.\d+)*)")
_CITING_TEXT = (".py", ".md", ".txt", ".rst", ".cmake")


def _citing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("SpineNetLib", "SpineNet", "Testing", "benchmarks", "docs"):
        files += [p for p in sorted((ROOT / folder).rglob("*"))
                  if p.is_file() and p.suffix in _CITING_TEXT and "__pycache__" not in p.parts]
    return files


def citations() -> list[tuple[str, str, str]]:
    """(kind, section, "file:line") for every citation; ranges give both ends."""
    found = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in _CITATION.finditer(text):      # on the whole text: "paper" may end a line
            kind, numbers = m.group(1), [m.group(2)]
            if m.group(3):
                numbers.append(re.sub(r"[^\d.]", "", m.group(3)))
            numbers += _MORE.findall(m.group(4))
            lineno = text.count("\n", 0, m.start()) + 1
            for number in numbers:
                found.append((kind, number.rstrip("."), f"{_rel(path)}:{lineno}"))
    return found


_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)[.\s]")
_ITEM = re.compile(r"^\s*(?:[-*|]\s*)?(?:\*\*)?(\d+\.\d+(?:\.\d+)*)(?:\*\*)?[\s|:)]")


def official_sections() -> set[str]:
    """Numbers of the headings and of the numbered items (lines opening with "11.4") of the doc."""
    numbers = set()
    for line in (DOCS / "OFFICIAL_IMPLEMENTATION.md").read_text(encoding="utf-8").splitlines():
        m = _HEADING.match(line) or _ITEM.match(line)
        if m:
            numbers.add(m.group(1).rstrip("."))
    return numbers


def _table_rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def paper_rows() -> set[str]:
    """Numbers of the rows of docs/ARCHITECTURE.md whose first cell reads "paper §N"."""
    numbers = set()
    for cells in _table_rows(DOCS / "ARCHITECTURE.md"):
        m = re.fullmatch(r"paper §(\d+(?:\.\d+)*)", cells[0])
        if m:
            numbers.add(m.group(1))
    return numbers


def test_citations_resolve():
    official, paper = official_sections(), paper_rows()
    found = citations()
    assert any(kind == "official" for kind, _, _ in found), "the citation scanner found nothing"
    missing = [f"  official §{n} at {where}" for kind, n, where in found if kind == "official" and n not in official]
    missing += [f"  paper §{n} at {where}" for kind, n, where in found if kind == "paper" and n not in paper]
    assert not missing, ("citations that docs/OFFICIAL_IMPLEMENTATION.md (headings, numbered items) or the "
                         "paper table of docs/ARCHITECTURE.md do not have:\n" + "\n".join(missing))


def test_citation_parser():
    line = "see official §3.2-3.3 and official §3.4, §7 (paper §4.4.1). Also official §5.2."
    m = list(_CITATION.finditer(line))
    assert [x.group(2) for x in m] == ["3.2", "3.4", "4.4.1", "5.2"]
    assert re.sub(r"[^\d.]", "", m[0].group(3)) == "3.3"
    assert _MORE.findall(m[1].group(4)) == ["7"]
    assert _CITATION.search("grades them (paper\n    §3.4) and").group(2) == "3.4"
    assert _ITEM.match("- **11.4** tanh").group(1) == "11.4"
    assert _HEADING.match("### 5.5 Labels").group(1) == "5.5"
    assert _HEADING.match("## 12. Unknowns").group(1) == "12"


# ----------------------------------------------------------------------------- (g) importorskip

_SKIP_OWN = re.compile(r"importorskip\(\s*[\"']" + "SpineNet" + r"Lib\b")


def test_tests_never_importorskip_spinenetlib():
    offenders = []
    for path in sorted((ROOT / "Testing").rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SKIP_OWN.search(line):
                offenders.append(f"  {_rel(path)}:{lineno}: {line.strip()}")
    assert not offenders, ("tests skip instead of failing when a SpineNetLib module does not import "
                           "(import it plainly):\n" + "\n".join(offenders))
