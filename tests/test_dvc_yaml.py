"""dvc.yaml against the code: every stage depends on each components/ module its command imports, and every
output is cached by DVC or tracked by git (so a fresh clone + `dvc pull` is up to date)."""

import ast
import subprocess
from pathlib import Path

import pytest
from dvc.repo import Repo

from tests.conftest import ROOT


def component_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """components/<module>.py and every components/ module it imports, directly or not (lazy imports too)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((ROOT / "components" / f"{module}.py").read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "components":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("components.")]
        for name in names:
            if (ROOT / "components" / f"{name}.py").exists():
                component_imports(name, seen)
    return seen


@pytest.fixture(scope="module")
def stages():
    with Repo(str(ROOT)) as repo:
        return [stage for stage in repo.index.stages if stage.cmd]


def test_every_stage_depends_on_the_modules_its_command_imports(stages):
    for stage in stages:
        verb = stage.cmd.split()[1]  # `braintumor <verb> ...` runs components/<verb>.py
        declared = {Path(str(dep)).resolve() for dep in stage.deps}
        needed = {(ROOT / "components" / f"{m}.py").resolve() for m in component_imports(verb)}
        missing = sorted(p.name for p in needed - declared)
        assert not missing, f"dvc.yaml stage {stage.name} imports but does not depend on {missing}"


def test_every_output_is_cached_by_dvc_or_tracked_by_git(stages):
    for stage in stages:
        for out in stage.outs:
            if out.use_cache:
                continue
            relative = Path(out.fs_path).resolve().relative_to(ROOT)
            ignored = subprocess.run(["git", "check-ignore", "-q", str(relative)], cwd=ROOT).returncode == 0
            assert not ignored, f"{stage.name}: {relative} is `cache: false` but gitignored: a clone would lack it"


def test_the_check_sees_a_missing_dependency():
    """The import walk itself: register ships the stacker and the image decoding inside the pyfunc."""
    assert {"stack", "images", "predict"} <= component_imports("register")


def test_dvc_collects_the_raw_data_file():
    """`dvc push`/`pull` only move what DVC collects; a gitignore pattern can hide data/raw.dvc from it."""
    with Repo(str(ROOT)) as repo:
        assert "data/raw.dvc" in [stage.addressing for stage in repo.index.stages]
