"""The house's plan: which package may import which, and no import cycle. Every import counts, including those
inside functions (the project defers heavy ones), since a deferred import still ties two modules together."""

import ast
from pathlib import Path

import networkx as nx
import pytest

from tests.conftest import ROOT

PACKAGES = ("components", "flows", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file: `import a.b` gives a.b, `from a import b` gives a.b when
    a/b.py is a module of the project, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists()
                          else node.module)
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            graph.add_node(name)
            for target in imported_modules(path):
                if target.split(".")[0] in PACKAGES and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_walk_sees_real_edges():
    graph = import_graph()
    # guards the test itself: a walk that found no edges would pass every check below
    assert graph.has_edge("flows.training", "components.config")
    assert graph.has_edge("flows.cli", "flows.training")  # a deferred import, inside a function


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_components_import_neither_flows_nor_prefect_nor_dvc():
    offenders = []
    for path in sorted((ROOT / "components").rglob("*.py")):
        for target in imported_modules(path):
            if target.split(".")[0] in ("flows", "prefect", "prefect_ray", "dvc", "bench"):
                offenders.append(f"{module_name(path)} imports {target}")
    assert not offenders, offenders


@pytest.mark.parametrize("where", ["components/cli.py", "components/services.py"])
def test_cli_and_services_live_outside_the_stage_verbs(where):
    assert not (ROOT / where).exists(), f"{where}: the CLI and the team services live in flows/, not components/"
