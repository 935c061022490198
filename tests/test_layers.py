"""The layers point one way: ``paceline`` → ``assets`` → ``resources`` → ``pipeline``.

Every import is read from the source with ``ast``, at module level and inside
functions, so a forbidden one fails here, naming its file, line and rule, even
in a module no other test imports. The rules are the tables below; a new leaf
module is one more name in ``LEAF_MODULES``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "assets", "resources", "paceline")

# (importer, what it must not import, why). A row covers a package and everything under it.
FORBIDDEN = (
    (
        "pipeline",
        ("dagster", "resources", "assets", "paceline"),
        "the engine sits under every layer and runs on Burla workers, which have no Dagster",
    ),
    ("resources", ("assets", "paceline"), "resources hand engine objects up to the assets, never the reverse"),
    ("assets", ("paceline",), "the YAML components and the code location sit on top of the asset factory"),
    *(
        (module, ("pipeline.runner",), "the planner, the store and the executors share the chunk types, not the runner")
        for module in ("pipeline.chunks", "pipeline.plan", "pipeline.manifests", "pipeline.executors")
    ),
    (
        "pipeline.shares",
        ("pipeline.leases", "pipeline.manifests", "pipeline.runner", "pipeline.backfill"),
        "the share arithmetic is pure: it reads no store and no clock, so it is tested on simulated time",
    ),
    (
        "pipeline.leases",
        ("pipeline.runner", "pipeline.backfill", "pipeline.chunks"),
        "a worker and an attempt both hold leases: the lease code sits under both",
    ),
    (
        "pipeline.sharing",
        ("pipeline.backfill", "pipeline.runner"),
        "an attempt's lease takes what it needs of a backfill as a protocol: the backfill calls it, not the reverse",
    ),
)

# Packages that import nothing of the project outside themselves.
SELF_CONTAINED = ("pipeline.pacing",)

# Modules that import no other project module, so every layer may import them (shared types, algorithms).
LEAF_MODULES = (
    "pipeline.pacing.aimd",
    "pipeline.pacing.cost",
    "pipeline.pacing.headers",
    "pipeline.pacing.inflight",
    "pipeline.pacing.memory",
    "pipeline.rows",
    "pipeline.errors",
    "pipeline.defaults",
    "pipeline.retries",
)

NO_CALL_TIME_IMPORTS = (
    "a project module is imported at module level only: Burla's pre-flight refuses a function "
    "that imports one when called, since its worker would not find it"
)


@dataclass(frozen=True)
class Import:
    """One module an import statement loads, where it is written, and whether it runs only when called."""

    path: Path
    line: int
    module: str
    in_function: bool

    def where(self) -> str:
        return f"{self.path.relative_to(PROJECT)}:{self.line} imports {self.module}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = PROJECT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, source: str) -> list[Import]:
    """Every module ``source`` (read from ``path``) imports: relative imports resolved, ``from a import b`` as ``a.b`` when b is a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(path, child.lineno, alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # from . / from .. : the importer's package, then one up per extra dot
                    parts = package.split(".")
                    anchor = parts[: len(parts) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    found.append(Import(path, child.lineno, submodule if is_module(submodule) else base, inside))
            visit(child, inside)

    visit(ast.parse(source, filename=str(path)), False)
    return found


def project_sources() -> dict[Path, str]:
    return {path: path.read_text() for package in PACKAGES for path in sorted((PROJECT / package).rglob("*.py"))}


def violations(sources: dict[Path, str]) -> list[str]:
    """Each broken rule as ``file:line imports module: the rule``."""
    broken = []
    for path, source in sources.items():
        importer = module_name(path)
        for found in imports_of(path, source):
            of_project = any(within(found.module, package) for package in PACKAGES)
            for covered, forbidden, why in FORBIDDEN:
                if within(importer, covered) and any(within(found.module, name) for name in forbidden):
                    broken.append(f"{found.where()}: {covered} must not import {', '.join(forbidden)} ({why})")
            for package in SELF_CONTAINED:
                if within(importer, package) and of_project and not within(found.module, package):
                    broken.append(f"{found.where()}: {package} imports nothing of the project outside itself")
            if importer in LEAF_MODULES and of_project:
                broken.append(f"{found.where()}: {importer} is a leaf module, it imports no project module")
            if of_project and found.in_function:
                broken.append(f"{found.where()} inside a function: {NO_CALL_TIME_IMPORTS}")
    return broken


def test_every_import_points_down_the_layers():
    broken = violations(project_sources())
    assert not broken, "\n".join(broken)


def test_every_module_a_rule_names_exists():
    named = [*LEAF_MODULES, *SELF_CONTAINED, *(row[0] for row in FORBIDDEN)]
    assert [name for name in named if not is_module(name)] == []


@pytest.mark.parametrize(
    ("where", "bad", "rule"),
    [
        ("pipeline/limits.py", "import dagster\n", "pipeline must not import dagster"),
        ("pipeline/runner.py", "def f():\n    from assets.keys import STORE_KEY\n", "pipeline must not import"),
        ("resources/service.py", "from paceline import Service\n", "resources must not import assets, paceline"),
        ("assets/keys.py", "import paceline.components\n", "assets must not import paceline"),
        ("pipeline/pacing/listen.py", "from pipeline.outcomes import Throttled\n", "pipeline.pacing imports nothing"),
        ("pipeline/pacing/headers.py", "from . import memory\n", "pipeline.pacing.headers is a leaf module"),
        ("pipeline/plan.py", "def f():\n    import pipeline.limits\n", "inside a function"),
        ("pipeline/manifests.py", "from pipeline.runner import run_chunk\n", "share the chunk types, not the runner"),
        ("pipeline/rows.py", "from pipeline.errors import PacelineError\n", "pipeline.rows is a leaf module"),
    ],
)
def test_a_forbidden_import_is_named_with_its_file_line_and_rule(where, bad, rule):
    """A real module that keeps the rules breaks one when a bad import is appended, and the message says where."""
    path = PROJECT / where
    source = path.read_text()
    assert violations({path: source}) == []
    line = source.count("\n") + bad.count("\n")
    broken = violations({path: source + bad})
    assert any(message.startswith(f"{where}:{line} ") and rule in message for message in broken), broken
