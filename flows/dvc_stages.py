"""DVC's own pipeline, as the flow sees it: the stages and their order come from `dvc.yaml`'s graph, a stage is
skipped when `dvc status` says it is up to date, and a stage the flow ran is committed only if its dependencies
and params are what they were when it started. A lock serialises training flows in one repo.

Every call opens the repo afresh and runs in the flow's own thread: DVC's state database and repo lock are not
meant for concurrent use, so the stages' commands run in parallel but DVC is only asked in between.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx
from filelock import FileLock, Timeout

from components.config import ProjectError

LOCK_FILE = Path(".dvc") / "tmp" / "braintumor-flow.lock"


class ConcurrentRun(ProjectError):
    pass


class DependenciesChanged(ProjectError):
    """A stage's inputs changed while it ran: its outputs match neither the old nor the new inputs."""


@dataclass(frozen=True)
class StageSpec:
    name: str  # DVC's address, e.g. `split` or `train@custom_cnn`
    cmd: str  # the command in dvc.yaml, run as it is
    wdir: Path  # relative to the repo root

    @property
    def group(self) -> str:
        """The dvc.yaml entry a stage comes from: `train` for every `train@<model>` of the matrix."""
        return self.name.split("@", 1)[0]


@contextmanager
def _repo(root: Path | str):
    """The DVC repo at `root`, with the current directory set to it: DVC resolves stage addresses and its stage
    cache against the current directory. Called only between generations, when no stage task is running."""
    from dvc.repo import Repo

    previous = os.getcwd()
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            yield repo
    finally:
        os.chdir(previous)


def pipeline_generations(root: Path | str) -> list[list[StageSpec]]:
    """dvc.yaml's stages in dependency order: each inner list can run in parallel once the ones before it ran."""
    with _repo(root) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        pipeline = graph.subgraph([s for s in graph.nodes if s.cmd])  # `dvc add`-ed data is no stage to run
        # wdir relative to the repo: a node that runs the stage in its own checkout finds it there too
        return [sorted((StageSpec(s.name, s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                                  Path(os.path.relpath(s.wdir, repo.root_dir))) for s in generation),
                       key=lambda spec: spec.name)
                for generation in nx.topological_generations(pipeline.reverse(copy=False))]


def stale_stages(names: list[str], root: Path | str) -> list[str]:
    """The stages among `names` that `dvc status` reports as changed (or never run)."""
    if not names:
        return []
    with _repo(root) as repo:
        return [name for name in names if repo.status(targets=[name])]


def changed_dependencies(root: Path | str) -> dict[str, list[str]]:
    """{stage: the dependencies `dvc status` reports changed since its last run (paths as dvc.yaml writes them)},
    for every stage with one; e.g. {"manifest": ["data/raw"]} once `data import --append` added scans."""
    with _repo(root) as repo:
        status = repo.status()
    changed: dict[str, list[str]] = {}
    for name, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and entry.get("changed deps"):
                changed.setdefault(name, []).extend(entry["changed deps"])
    return changed


def _fingerprints(repo, name: str) -> dict[str, str]:
    from dvc.dependency.param import ParamsDependency

    (stage,) = repo.stage.collect(name)
    prints = {}
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            prints[f"{dep.def_path} ({', '.join(dep.params) or 'all'})"] = json.dumps(
                dep.read_params(), sort_keys=True, default=str)
        else:
            prints[dep.def_path] = dep.get_hash().value if dep.exists else "missing"
    return prints


def dependency_fingerprints(names: list[str], root: Path | str) -> dict[str, dict[str, str]]:
    """Per stage, a hash of every file dependency and the values of every params dependency, as of now."""
    with _repo(root) as repo:
        return {name: _fingerprints(repo, name) for name in names}


def commit_unchanged(name: str, started_with: dict[str, str], root: Path | str) -> None:
    """Record the outputs of a stage the flow ran in dvc.lock, as `dvc repro` would, after checking that its
    dependencies and params still have the values they had when it started. If one changed (an edit, a
    `git pull`, a concurrent writer), nothing is committed and the error names what changed."""
    with _repo(root) as repo:
        now = _fingerprints(repo, name)
        changed = sorted(key for key in started_with.keys() | now.keys() if started_with.get(key) != now.get(key))
        if changed:
            raise DependenciesChanged(
                f"{name}: these dependencies changed while it ran, so its outputs were not committed: "
                f"{', '.join(changed)}. Run the flow (or `dvc repro {name}`) again once they are settled")
        # The check above is what makes force safe: DVC's own check would only ask "are you sure?" because the
        # stage's outputs changed, which is what running it means.
        repo.commit(name, force=True)


def _pid_running(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _dead_holder(owner: str) -> int | None:
    """The pid an `.owner` record names when it is on this host and no longer running, else None."""
    found = re.match(r"pid (\d+) on (\S+)", owner)
    if found and found.group(2) == socket.gethostname() and not _pid_running(int(found.group(1))):
        return int(found.group(1))
    return None


def _takeover_message(owner: str, holder: Path) -> str:
    """What a run says when it finds the `.owner` record of a run that ended without releasing the lock (killed,
    or its machine lost): the lock itself was released with the process, only the record stayed behind."""
    found = re.match(r"pid (\d+) on (\S+)(?: since (\S+))?", owner)
    if not found:
        return f"taking over the lock left behind in {holder} ({owner or 'empty'})"
    pid, host, since = int(found.group(1)), found.group(2), found.group(3) or "an unknown time"
    if host != socket.gethostname():
        return (f"taking over the lock of pid {pid} on {host} (held since {since}): it no longer holds the lock; "
                "stages it finished are committed, the others run again")
    state = "no longer running" if not _pid_running(pid) else "running, but no longer holding the lock"
    return (f"taking over the lock of pid {pid}, {state} (held since {since}); stages it finished are committed, "
            "the others run again")


def _logger():
    """The flow run's logger inside a Prefect run (so the message reaches the UI), else this module's."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError: called outside a flow or task run
        return logging.getLogger(__name__)


@contextmanager
def run_lock(timeout: float, root: Path | str = "."):
    """One training flow per repo at a time; a second run waits up to `timeout` seconds, then fails clearly.

    The lock is an OS file lock, released by the kernel when its process dies, even by `kill -9`; the `.owner`
    record beside it then stays behind, and the next run takes over saying whose lock it was."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_suffix(".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        owner = holder.read_text().strip() if holder.exists() else "unknown"
        hint = ""
        if (dead := _dead_holder(owner)) is not None:
            hint = (f" pid {dead} is no longer running, so a process it started holds the lock: find it with "
                    f"`fuser {path}`.")
        raise ConcurrentRun(f"another train_pipeline run holds {path} ({owner}); waited {timeout:g} s.{hint} "
                            "Wait for it to finish, or raise flow.lock_timeout in params.yaml") from None
    try:
        if holder.exists():
            _logger().warning(_takeover_message(holder.read_text().strip(), holder))
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
