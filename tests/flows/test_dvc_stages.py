"""The flow runs DVC's own stages: order from dvc.yaml's graph, each stage's own cmd, skip what `dvc status` says is
up to date, commit only what ran on unchanged inputs. A toy dvc.yaml of small Python commands stands in for the
real pipeline, so these run in seconds."""

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from prefect import flow

import flows.training as training
from flows.dvc_stages import pipeline_generations, stale_stages
from tests.conftest import ROOT, git_dvc_repo, tiny_params

MAKE = textwrap.dedent("""
    import os, pathlib, sys
    name, *inputs = sys.argv[1:]
    if name in os.environ.get("FAIL_STAGES", "").split(","):
        print("boom in", name)
        sys.exit(4)
    pathlib.Path("out").mkdir(exist_ok=True)
    text = "".join(pathlib.Path(p).read_text() for p in inputs)
    pathlib.Path("out", name + ".txt").write_text(name + ":" + text)
    if name == os.environ.get("EDIT_DEP_IN"):  # a dependency edited while the stage runs
        with open("in.txt", "a") as f:
            f.write("edited\\n")
""")

DVC_YAML = textwrap.dedent("""
    stages:
      first:
        cmd: python make.py first in.txt
        deps: [make.py, in.txt]
        params: [value]
        outs: [out/first.txt]
      train:
        matrix:
          model: [x, y]
        cmd: python make.py train-${item.model} out/first.txt
        deps: [make.py, out/first.txt]
        outs:
          - out/train-${item.model}.txt
      last:
        cmd: python make.py last out/train-x.txt out/train-y.txt
        deps: [out/train-x.txt, out/train-y.txt]
        outs: [out/last.txt]
""")


@pytest.fixture
def toy_repo(tmp_path) -> Path:
    return git_dvc_repo(tmp_path / "toy", {"make.py": MAKE, "dvc.yaml": DVC_YAML, "params.yaml": "value: 1\n",
                                           "in.txt": "input\n"})


def run(repo: Path, params_overrides: list[str] | None = None):
    params = tiny_params(ROOT, ["flow.retries=0", "devices.cpu_concurrency=2", *(params_overrides or [])])

    @flow
    def generations():
        return training.run_generations(params, repo, dict(os.environ))

    return generations.with_options(task_runner=training.task_runner(params))()


def dvc_status(repo: Path) -> str:
    return subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_stages_and_their_order_come_from_dvc_yaml(toy_repo):
    generations = pipeline_generations(toy_repo)
    assert [[s.name for s in g] for g in generations] == [["first"], ["train@x", "train@y"], ["last"]]
    assert generations[1][0].cmd == "python make.py train-x out/first.txt" and generations[1][0].group == "train"


def test_every_stage_runs_its_own_command_then_nothing_is_stale(prefect_harness, toy_repo):
    ran, skipped = run(toy_repo)
    assert ran == ["first", "train@x", "train@y", "last"] and skipped == []
    assert (toy_repo / "out" / "last.txt").read_text() == "last:train-x:first:input\ntrain-y:first:input\n"
    assert "up to date" in dvc_status(toy_repo)
    assert stale_stages(["first", "train@x", "last"], toy_repo) == []
    assert run(toy_repo) == ([], ["first", "train@x", "train@y", "last"])

    (toy_repo / "params.yaml").write_text("value: 2\n")  # a params dependency changes: `first` reruns
    ran, _ = run(toy_repo)
    assert ran == ["first"], "outputs of first are unchanged, so the trainings stay up to date"


def test_a_dependency_edited_during_the_run_is_not_committed(prefect_harness, toy_repo, monkeypatch):
    monkeypatch.setenv("EDIT_DEP_IN", "first")
    # DependenciesChanged is collected with the generation's other failures and reported as the flow's StageFailed.
    with pytest.raises(training.StageFailed, match=r"first: these dependencies changed while it ran.*in\.txt"):
        run(toy_repo)
    assert stale_stages(["first"], toy_repo) == ["first"], "the stage must still be stale in DVC's eyes"
    assert not (toy_repo / "dvc.lock").exists()


def test_a_failed_stage_stops_the_pipeline_after_its_generation_finishes(prefect_harness, toy_repo,
                                                                         monkeypatch):
    monkeypatch.setenv("FAIL_STAGES", "train-y")
    with pytest.raises(training.StageFailed, match=r"(?s)train@y failed \(exit 4\).*boom in train-y"):
        run(toy_repo)
    assert stale_stages(["first", "train@x", "train@y", "last"], toy_repo) == ["train@y", "last"]
    assert not (toy_repo / "out" / "last.txt").exists()
    assert "boom in train-y" in (toy_repo / "logs" / "train-y.log").read_text()
