"""The layout's contract (docs/ARCHITECTURE.md), read from the source: the import graph between normbench's
modules (module-level and function-level imports alike) is acyclic and goes one way, layer by layer, and
every config group's code is in the module the architecture table names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import CONF, ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "normbench"

BASE = ("normbench.errors", "normbench.record", "normbench.schema", "normbench.identity",
        "normbench.preflight")
RUN_PARTS = ("normbench.activations", "normbench.norms", "normbench.losses", "normbench.optim",
             "normbench.device", "normbench.data", "normbench.datasets", "normbench.models",
             "normbench.probes", "normbench.faults", "normbench.filters", "normbench.checkpoint",
             "normbench.interrupts", "normbench.trainer", "normbench.loggers", "normbench.targets",
             "normbench.pruning", "normbench.fused", "normbench.fused_trainer",
             "normbench.fused_launch")
ALLOWED = {
    **{m: BASE + RUN_PARTS for m in RUN_PARTS},
    **{m: BASE for m in BASE},
    "normbench.validate": BASE + RUN_PARTS,
    "normbench.run": BASE + RUN_PARTS + ("normbench.validate",),
    "normbench.sweep": BASE + ("normbench.sweep",),
    "normbench.job": BASE + RUN_PARTS + ("normbench.validate", "normbench.run", "normbench.sweep"),
    # the entry side beside the job: what bench/plan.py and the Hydra callbacks run
    "normbench.plan": BASE + RUN_PARTS + ("normbench.validate", "normbench.sweep"),
    "normbench.callbacks": BASE + RUN_PARTS + ("normbench.validate", "normbench.run", "normbench.sweep",
                                               "normbench.job", "normbench.plan", "normbench.api"),
    # what the sweep process records for a job whose launcher worker died
    "normbench.dead_jobs": BASE + RUN_PARTS + ("normbench.validate", "normbench.run", "normbench.sweep",
                                               "normbench.job"),
    # the notebook API: the job (train) and the report's record reader (load_runs)
    "normbench.api": BASE + ("normbench.job", "normbench.report"),
    "normbench.report": BASE + ("normbench.report", "normbench.loggers"),
    "normbench.perf": BASE + RUN_PARTS + ("normbench.validate", "normbench.run", "normbench.perf"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The normbench / hydra_plugins modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("normbench", "hydra_plugins")}


def known(name: str, modules: set[str]) -> str | None:
    """The module a dotted import name refers to (`normbench.run.Run` -> `normbench.run`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: {m for i in imports_of(path) if (m := known(i, modules)) and m != name}
            for name, path in files.items()}


def rule_for(module: str) -> tuple[str, ...]:
    key = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)
    return ALLOWED[key]


def test_every_module_has_a_place_in_the_layers(graph):
    for module in graph:
        if module == "normbench":
            continue
        assert any(module == k or module.startswith(k + ".") for k in ALLOWED), f"{module} has no layer"


def test_imports_go_one_way(graph):
    bad = []
    for module, targets in graph.items():
        if module == "normbench":
            continue
        allowed = rule_for(module)
        for target in targets:
            if target != "normbench" and not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_import_graph_is_acyclic(graph):
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, target]))
            if state.get(target) is None:
                visit(target, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_normbench_never_imports_the_sweeper_plugin():
    for path in PACKAGE.rglob("*.py"):
        assert not any(i.startswith("hydra_plugins") for i in imports_of(path)), path


def test_architecture_table_names_each_groups_module():
    """docs/ARCHITECTURE.md's table: every config group of conf/ with the module that has its code."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra") + ["hydra/launcher"]
    for group in groups:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{group}` ")), None)
        assert row is not None, f"docs/ARCHITECTURE.md has no row for the {group} group"
        modules = [m for m in row.split("`")[3::2] if m.startswith(("normbench", "hydra_plugins", "conf/"))]
        assert modules, row
        for module in modules:
            if module.startswith("conf/"):
                assert (ROOT / module).exists(), module
                continue
            parts = module.split(".")
            path = SRC.joinpath(*parts)
            assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), module
