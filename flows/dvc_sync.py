"""Keep Prefect runs and `dvc repro` in agreement: skip stages DVC says are up to date, `dvc commit` the ones a
flow ran, and serialise concurrent runs with a lock."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FILE = Path(".dvc") / "tmp" / "braintumor-flow.lock"


class ConcurrentRun(RuntimeError):
    pass


def stage_up_to_date(stage: str, root: Path | str = ".") -> bool:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def commit(stage: str, root: Path | str = ".") -> None:
    """Record the outputs a flow produced for `stage` in dvc.lock, as `dvc repro` would have."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(stage, force=True)


@contextmanager
def run_lock(timeout: float, root: Path | str = "."):
    """One training flow per repo at a time; a second run waits up to `timeout` seconds, then fails clearly."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        holder = path.with_suffix(".owner")
        owner = holder.read_text().strip() if holder.exists() else "unknown"
        raise ConcurrentRun(f"another train_pipeline run holds {path} ({owner}); waited {timeout:g} s. "
                            "Wait for it to finish, or raise flow.lock_timeout in params.yaml") from None
    try:
        path.with_suffix(".owner").write_text(f"pid {os.getpid()}\n")
        yield
    finally:
        path.with_suffix(".owner").unlink(missing_ok=True)
        lock.release()
