"""No import cycle inside ``hf_backdoor``: the import graph, read from the source's AST, has no strongly connected
component with more than one module (Tarjan).

An edge ``a -> b`` means that running module ``a`` imports module ``b`` (``b`` a module or a package's
``__init__``). Edges come from every ``import``/``from ... import`` statement, at module level and inside functions
and methods (a lazy import still closes a cycle the first time the function runs, and hides it from a reader).
Imports under ``if TYPE_CHECKING:`` never run and are left out.

- ``from . import x`` where ``x`` is a submodule is an edge to that submodule; where ``x`` is a name defined in the
  package, an edge to the package's ``__init__``.
- ``from .pkg import name`` is an edge to ``pkg``'s module (its ``__init__`` for a package).
- Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so it is an edge to each of those packages too,
  except the packages the importing module itself lives in (they are already being imported).
- A package ``__init__`` importing its children counts like any other module.

Run ``python tests/test_import_cycles.py`` to print every cycle with the lines that close it.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path
from typing import NamedTuple

PACKAGE = "hf_backdoor"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


class Edge(NamedTuple):
    source: str
    target: str
    line: int
    statement: str
    via_parent: bool  # the target is a parent package that the import runs on the way to a submodule


def module_names(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_relative(module: str, level: int, target: str | None, modules: dict[str, Path]) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for statement in node.body:
                    lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return lines


def _closest_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module, else its longest prefix that is one (``pkg.func`` -> ``pkg``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets_with_parents(source: str, target: str, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``target`` and the packages above it that importing it runs, minus those ``source`` lives in."""
    own_packages = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 2)}
    if _is_package(source, modules):
        own_packages.add(source)
    parts = target.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    out = [(p, True) for p in parents if p in modules and p not in own_packages]
    out.append((target, False))
    return out


def import_edges(modules: dict[str, Path] | None = None) -> list[Edge]:
    """Every import edge between the package's modules (see the module docstring for the rules)."""
    modules = module_names() if modules is None else modules
    edges = []
    for source, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        skipped = _type_checking_lines(tree)
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = (
                    _resolve_relative(source, node.level, node.module, modules) if node.level else (node.module or "")
                )
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg's module.
                    targets.append(submodule if submodule in modules else base)
            statement = lines[node.lineno - 1].strip()
            for name in targets:
                if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
                    continue
                target = _closest_module(name, modules)
                if target is None:
                    continue
                for module, via_parent in _targets_with_parents(source, target, modules):
                    if module != source:
                        edges.append(Edge(source, module, node.lineno, statement, via_parent))
    return edges


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative, so deep graphs cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
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
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside one component (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & members):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if successor not in previous:
                previous[successor] = node
                queue.append(successor)
    return [start, start]


def find_cycles(edges: list[Edge] | None = None) -> list[str]:
    """One readable description per import cycle: a shortest cycle of each component, with the lines closing it."""
    edges = import_edges() if edges is None else edges
    graph: dict[str, set[str]] = {m: set() for m in module_names()}
    by_pair: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph[edge.source].add(edge.target)
        by_pair.setdefault((edge.source, edge.target), edge)
    descriptions = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        cycle = _shortest_cycle(component[0], set(component), graph)
        steps = []
        for source, target in zip(cycle, cycle[1:]):
            edge = by_pair[(source, target)]
            how = " (runs the package's __init__ on the way to a submodule)" if edge.via_parent else ""
            steps.append(f"  {source} -> {target}: line {edge.line} `{edge.statement}`{how}")
        # Every import between the component's modules: breaking the cycle above may leave another one.
        inside = sorted(
            {f"    {e.source} -> {e.target} (line {e.line})" for e in edges if {e.source, e.target} <= set(component)}
        )
        descriptions.append(
            f"cycle {' -> '.join(cycle)}\n"
            + "\n".join(steps)
            + f"\n  all imports inside its component of {len(component)} modules:\n"
            + "\n".join(inside)
        )
    return descriptions


# -- the checker's own behaviour, on small packages written for the test ------------------------------------------
def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        path = root / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_names(root / PACKAGE)


def test_the_checker_finds_each_kind_of_edge(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "__init__.py": "from .trainer import Trainer\n",
            "trainer.py": "from .defenses.base import Defense\n\ndef sanitize():\n    from . import cards\n",
            "cards.py": "from hf_backdoor.defenses import DEFENSES\n",
            "defenses/__init__.py": "from .base import DEFENSES\nfrom . import btu\n",
            "defenses/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..trainer import Trainer\n",
            "defenses/btu.py": "from .. import registry\nfrom ..registry import register\n",
            "registry.py": "import json\n",
        },
    )
    pairs = {(e.source, e.target, e.via_parent) for e in import_edges(modules)}
    assert pairs == {
        ("hf_backdoor", "hf_backdoor.trainer", False),  # a package __init__ importing its child
        ("hf_backdoor.trainer", "hf_backdoor.defenses", True),  # importing defenses.base runs defenses/__init__
        ("hf_backdoor.trainer", "hf_backdoor.defenses.base", False),
        ("hf_backdoor.trainer", "hf_backdoor.cards", False),  # function-level, `from . import submodule`
        ("hf_backdoor.cards", "hf_backdoor.defenses", False),  # `from pkg import name`: pkg's __init__
        ("hf_backdoor.defenses", "hf_backdoor.defenses.base", False),
        ("hf_backdoor.defenses", "hf_backdoor.defenses.btu", False),
        ("hf_backdoor.defenses.btu", "hf_backdoor.registry", False),
    }  # defenses/base.py's TYPE_CHECKING import and the stdlib imports are not edges


def test_the_checker_reports_a_cycle_with_its_lines(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "trainer.py": "from .defenses.base import Defense\n",
            "defenses/__init__.py": "from .sanitize import sanitize_model\n",
            "defenses/base.py": "",
            "defenses/sanitize.py": "def sanitize_model():\n    from ..trainer import BackdoorSafeTrainer\n",
        },
    )
    edges = import_edges(modules)
    graph = {m: {e.target for e in edges if e.source == m} for m in modules}
    components = [c for c in strongly_connected_components(graph) if len(c) > 1]
    assert components == [["hf_backdoor.defenses", "hf_backdoor.defenses.sanitize", "hf_backdoor.trainer"]]
    assert sorted(m for c in strongly_connected_components(graph) for m in c) == sorted(modules)


def test_hf_backdoor_has_no_import_cycle():
    cycles = find_cycles()
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}:\n" + "\n\n".join(cycles)


if __name__ == "__main__":
    found = find_cycles()
    print("\n\n".join(found) if found else f"No import cycle in {PACKAGE}.")
    sys.exit(1 if found else 0)
