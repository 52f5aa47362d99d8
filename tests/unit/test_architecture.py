"""The import contract (docs/architecture.md, "Layers"), checked over the source with ``ast``:

- the core package ``fedmtl/`` imports neither Prefect nor MLflow, nor the shell packages
  ``cli``, ``flows`` and ``tasks`` (lazy imports inside functions included);
- the shell packages are imported only by the shell itself (``cli/``, ``flows/``, ``tasks/``)
  and by tests and benchmarks;
- no cycle between the project's top-level packages (``fedmtl``, ``models``, ``cli``, ``flows``,
  ``tasks``: the core depends on none of them, the served model on the core only, ...), nor
  between the data sources;
- no cycle between the core's packages (``client``, ``server``, ``privacy``, ``data``, ``eval``,
  ``lifecycle``, ``algorithms``, ``nn``) and its root modules (``state``, ``config``, ...; the
  federation and the round loop, which use them all, as one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = "fedmtl"
SHELL = ("cli", "flows", "tasks")
CORE_FORBIDDEN = ("prefect", "mlflow", *SHELL)
MAY_IMPORT_SHELL = (*SHELL, "tests", "benchmarks")
NOT_CODE = {"data", "mlflow", "dvc-remote", "build", "dist", "node_modules", "venv"}


def imports(source: str, filename: str = "<string>") -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth (module level,
    functions, ``if TYPE_CHECKING``, ``try``). A relative import is resolved against the package
    of ``filename`` when that is a path under ROOT, else kept with its leading dots."""
    package = _package_of(filename)
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0:
                yield node.lineno, module
            elif package is not None and node.level - 1 <= len(package):
                base = package[: len(package) - (node.level - 1)]
                yield node.lineno, ".".join([*base, *([module] if module else [])])
            else:
                yield node.lineno, "." * node.level + module


def _package_of(filename: str) -> list[str] | None:
    """The package a module (or an __init__) under ROOT lives in, as its name's parts."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except (ValueError, OSError):
        return None
    return list(rel.parts[:-1])


def top(module: str) -> str:
    return module.split(".", 1)[0]


def python_files(under: Path) -> list[Path]:
    """Every .py file under ``under``; at the repository root, the code only: top-level modules
    and folders, less hidden ones, virtual environments and the data and store folders."""
    if under != ROOT:
        return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)
    files = [p for p in ROOT.glob("*.py")]
    for folder in ROOT.iterdir():
        if (
            folder.is_dir()
            and not folder.name.startswith(".")
            and folder.name not in NOT_CODE
            and not folder.name.endswith(".egg-info")
        ):
            files += python_files(folder)
    return sorted(files)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}" if path.is_relative_to(ROOT) else f"{path}:{line}"


# the scanner itself: a contract test whose scanner found nothing would pass vacuously


def test_the_scanner_finds_imports_at_every_depth() -> None:
    snippet = (
        "import os, mlflow.tracking as mt\n"
        "from prefect import flow\n"
        "def f():\n"
        "    import flows.training\n"
        "    if True:\n"
        "        from tasks.registry import load_predictor\n"
        "class C:\n"
        "    def m(self):\n"
        "        try:\n"
        "            from cli.app import console\n"
        "        except ImportError:\n"
        "            pass\n"
    )
    found = sorted(imports(snippet))
    assert found == [
        (1, "mlflow.tracking"),
        (1, "os"),
        (2, "prefect"),
        (4, "flows.training"),
        (6, "tasks.registry"),
        (10, "cli.app"),
    ]
    assert {top(m) for _, m in found} >= set(CORE_FORBIDDEN)


def test_relative_imports_resolve_to_their_package() -> None:
    fake = str(ROOT / "fedmtl" / "data" / "x.py")
    assert list(
        imports("from . import sources\nfrom ..config import Config\nfrom .har import y\n", fake)
    ) == [(1, "fedmtl.data"), (2, "fedmtl.config"), (3, "fedmtl.data.har")]


def test_the_core_check_would_fail_on_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def g():\n    import prefect\n")
    assert _core_violations([bad]) == [f"{bad}:2 imports prefect"]


# the contract


def _core_violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for line, module in imports(path.read_text(encoding="utf-8"), str(path)):
            if top(module) in CORE_FORBIDDEN:
                found.append(f"{where(path, line)} imports {module}")
    return found


def test_the_core_imports_no_orchestration_tracking_or_shell() -> None:
    files = python_files(ROOT / CORE)
    assert len(files) > 20, f"found only {len(files)} files under {CORE}/: is ROOT ({ROOT}) right?"
    violations = _core_violations(files)
    assert not violations, (
        "the core (fedmtl/) must not import Prefect, MLflow, cli, flows or tasks:\n  "
        + "\n  ".join(violations)
    )


def test_the_shell_is_imported_only_by_the_shell_tests_and_benchmarks() -> None:
    violations = []
    scanned = 0
    for path in python_files(ROOT):
        owner = path.relative_to(ROOT).parts[0]
        if owner in MAY_IMPORT_SHELL:
            continue
        scanned += 1
        for line, module in imports(path.read_text(encoding="utf-8"), str(path)):
            if top(module) in SHELL:
                violations.append(f"{where(path, line)} imports {module}")
    assert scanned > 20, f"scanned only {scanned} files outside the shell: is ROOT ({ROOT}) right?"
    assert not violations, (
        "cli, flows and tasks may be imported only by cli/, flows/, tasks/, tests and "
        "benchmarks:\n  " + "\n  ".join(violations)
    )


@pytest.mark.parametrize("package", SHELL)
def test_each_shell_package_exists(package: str) -> None:
    # the rule names real packages: a rename would otherwise make it check nothing
    assert (ROOT / package / "__init__.py").is_file()


# no cycles

PACKAGES = ("fedmtl", "models", "cli", "flows", "tasks")


def package_graph(groups: dict[str, str]) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """Edges between the named groups of modules: ``groups`` maps a module-name prefix to its
    group (the longest prefix wins); an import of one group by another is an edge, with where."""

    def group(module: str) -> str | None:
        best = max(
            (p for p in groups if module == p or module.startswith(p + ".")), key=len, default=None
        )
        return None if best is None else groups[best]

    edges: dict[str, set[str]] = {g: set() for g in groups.values()}
    seen: dict[tuple[str, str], str] = {}
    for path in python_files(ROOT):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        source = group(name)
        if source is None:
            continue
        for line, module in imports(path.read_text(encoding="utf-8"), str(path)):
            target = group(module)
            if target is not None and target != source:
                edges[source].add(target)
                seen.setdefault((source, target), where(path, line))
    return edges, seen


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


CORE_PACKAGES = (
    "algorithms",
    "client",
    "data",
    "eval",
    "lifecycle",
    "nn",
    "privacy",
    "server",
    "sites",
)
#: the core's packages, and its root modules each a node of its own (the loop and the federation,
#: which use every package, one node): no package may import one that imports it back
CORE_GROUPS = {
    **{f"fedmtl.{p}": p for p in CORE_PACKAGES},
    **{f"fedmtl.{m}": m for m in ("bundle", "config", "faults", "quiet", "state")},
    "fedmtl.federation": "federation",
    "fedmtl.rounds": "federation",
}


@pytest.mark.parametrize(
    "groups",
    [
        {p: p for p in PACKAGES},
        CORE_GROUPS,
        {
            "fedmtl.data.sources": "sources",
            "fedmtl.data.har": "har",
            "fedmtl.data.heart": "heart",
            "fedmtl.data.raw": "raw",
        },
    ],
    ids=["top-level packages", "core packages", "data sources"],
)
def test_no_import_cycles(groups: dict[str, str]) -> None:
    edges, seen = package_graph(groups)
    assert sum(len(v) for v in edges.values()) > 0, (
        "no imports found between the groups: is the scan right?"
    )
    found = cycle(edges)
    assert found is None, (
        "import cycle "
        + " -> ".join(found)
        + ": "
        + "; ".join(f"{a} -> {b} at {seen[(a, b)]}" for a, b in zip(found, found[1:]))
    )


#: the most lines a module of the project's code (``fedmtl``, ``models``, ``cli``, ``flows``,
#: ``tasks``) may have, and the modules allowed more, each with why (tests and benchmarks are
#: scripts of their own and not held to it)
MAX_LINES = 400
LONG_MODULES: dict[str, str] = {}


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in python_files(ROOT / package)
    }
    assert len(sizes) > 50 and max(sizes.values()) > 100, (
        "too few modules measured: is the scan right?"
    )
    unexplained = {p: n for p, n in sizes.items() if n > MAX_LINES and p not in LONG_MODULES}
    assert not unexplained, (
        f"modules over {MAX_LINES} lines (split them by role, or add them with why to "
        f"LONG_MODULES): {unexplained}"
    )
