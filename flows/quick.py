"""`braintumor quick`: the whole pipeline once, on a small sample at a small size, before committing to hours.

It runs in a scratch git worktree of HEAD (params quick.worktree, made afresh), so the workspace's data, params and
outputs stay as they are. There it runs the main job's own commands, each as `dvc.yaml` and the README run them:
`data import --sample`, the labelled collection appended with `--append --sample`, `flow train` with the overrides
of params quick.overrides (written into the checkout's params.yaml under the run lock, as `dvc exp run -S` does; one
of them is tracking.smoke: every MLflow run, registered version and the results page say "smoke run", and
`braintumor promote` refuses its versions), `evaluate-external` on each shared set, and `report`. The stage commands
import the checkout's code (PYTHONPATH). MLflow records go where MLFLOW_TRACKING_URI points (README step 2: the
project's store), else to the checkout's own store.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from components.config import Params, ProjectError
from flows.dvc_stages import StageSpec
from flows.training import run_command

log = logging.getLogger(__name__)

def fresh_worktree(repo: Path, tree: Path) -> None:
    """A new detached worktree of HEAD at `tree`, replacing any earlier one."""
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)
    done = subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), "HEAD"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode:
        raise ProjectError(f"`git worktree add {tree} HEAD` failed in {repo}: {done.stderr.strip()} (the quick profile "
                           "runs the committed code of a git checkout)")


def quick_commands(params: Params, repo: Path) -> list[tuple[str, str]]:
    """(step, shell command) of the quick profile, paths resolved against the repo root."""
    quick = params.quick

    def path(value: Path) -> str:
        return shlex.quote(str((repo / value).resolve()))

    overrides = " ".join(f"-S {shlex.quote(o)}" for o in quick.overrides)
    steps = [("import a sample", f"braintumor data import --source {path(quick.data)} --sample {quick.sample}")]
    if quick.append:
        steps.append(("append labelled scans", f"braintumor data import --source {path(quick.append)} --append "
                      f"--labels {shlex.quote(quick.append_labels)} --classes {','.join(quick.append_classes)} "
                      f"--sample {quick.append_sample}"))
    steps.append(("every dvc.yaml stage", f"braintumor {overrides} flow train"))
    steps += [(f"evaluate-external {Path(source).name}", f"braintumor evaluate-external --source {path(source)}")
              for source in quick.external]
    steps.append(("results page", "braintumor report"))
    return steps


def run_quick(params: Params, repo: Path | str = ".") -> dict:
    """Run the quick profile (see the module docstring); returns each step's minutes and where the outputs are."""
    repo = Path(repo).resolve()
    tree = (repo / params.quick.worktree).resolve()
    start = time.perf_counter()
    fresh_worktree(repo, tree)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    minutes = {}
    steps = quick_commands(params, repo)
    for number, (step, command) in enumerate(steps, 1):
        log.info("step %d of %d: %s", number, len(steps), step)
        name = "quick-" + step.split()[0] if not step.startswith("evaluate-external") else f"quick-{step}"
        seconds = run_command(StageSpec(name.replace(" ", "-"), command, Path(".")), tree, env,
                              tree / "logs" / f"{name.replace(' ', '-')}.log", params.flow.log_tail_lines)
        minutes[step] = round(seconds / 60, 2)
    return {"worktree": str(tree), "minutes": minutes, "total_minutes": round((time.perf_counter() - start) / 60, 2),
            "report": str(tree / params.report.out), "registered": str(tree / params.paths.registered),
            "smoke": "every MLflow run, registered version and the page are marked smoke; `braintumor promote` "
                     "refuses them"}
