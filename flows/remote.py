"""Where a stage's command runs: in the flow's own workspace, or in a node-local checkout on a cluster node that
shares no disk with the flow.

`SharedWorkspace`: the flow's repo, seen at the same path (the flow's own threads, the local Ray a flow starts, or
a cluster whose nodes mount the repo there: params flow.shared_workspace). The stage runs there, and the flow commits
it to dvc.lock as `dvc repro` would (flows.dvc_stages.commit_unchanged).

`NodeCheckout`: everything else a cluster node needs travels through the team's remotes, never a shared disk:
1. the node clones the flow run's git commit from the git remote (flow.git_remote) into a scratch folder of its own
   (BRAINTUMOR_NODE_SCRATCH), and writes over it the DVC metafiles the flow sent (dvc.lock, params.yaml with the
   run's overrides, the `.dvc` files), which name every input by content hash;
2. it pulls exactly the stage's DVC-tracked dependencies from the DVC remote (flow.dvc_remote);
3. it runs the stage's own dvc.yaml command, logging to the tracking server its environment names;
4. it commits the stage in its checkout and pushes the outputs to the DVC remote;
5. it returns the stage's dvc.lock entry (deps, params and outs hashes), the small outputs DVC keeps in git
   (`cache: false`: metrics, histories) and the files it opened (a Python audit hook in every process it starts).
The flow then checks that the entry's deps and params are the ones it sent, writes it into dvc.lock, and checks the
outputs out from the remote (`land`). Secrets travel only in the environment: a task's arguments hold no credential.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from components.config import ProjectError

SCRATCH_ENV = "BRAINTUMOR_NODE_SCRATCH"  # a node's folder for stage checkouts and its DVC cache
# How this node reaches the DVC remote, when it reaches it by another address than the flow (an internal endpoint).
REMOTE_URL_ENV = "BRAINTUMOR_DVC_REMOTE_URL"
OPEN_RECORD_ENV = "BRAINTUMOR_OPEN_RECORD"  # where the audit hook writes each path a stage's processes open
METAFILE_SUFFIXES = (".dvc",)
AUDIT_HOOK = '''
import os, sys
_record = os.environ.get("{record}")
if _record:
    _skip = tuple({{os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}})
    _out = open(_record, "a", buffering=1)
    def _opened(event, args):
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            path = os.path.abspath(os.fspath(args[0]))
            if not path.startswith(_skip):
                _out.write(path + "\\n")
    sys.addaudithook(_opened)
'''


class RemoteStageFailed(ProjectError):
    pass


@dataclass(frozen=True)
class SharedWorkspace:
    root: Path

    def describe(self) -> str:
        return f"the workspace {self.root}"


@dataclass(frozen=True)
class NodeCheckout:
    """What a node needs to run one stage away from the flow's disk (see the module docstring)."""
    stage: str
    commit: str
    git_url: str
    dvc_remote: str  # a URL or an absolute path
    metafiles: dict[str, str] = field(repr=False)  # path in the repo -> text (dvc.lock, params.yaml, *.dvc)
    pulls: tuple[str, ...] = ()  # the stage's DVC-tracked dependencies

    def describe(self) -> str:
        return f"a checkout of {self.commit[:12]} on node {socket.gethostname()}"


def _run(command: list[str], cwd: Path, env: dict[str, str], what: str, stage: str) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RemoteStageFailed(f"{stage} on node {socket.gethostname()}: {what} failed ({shlex.join(command[:4])} "
                                f"...): {(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def node_scratch() -> Path:
    root = os.environ.get(SCRATCH_ENV)
    return Path(root) if root else Path.home() / ".cache" / "braintumor" / "stages"


def prepare_checkout(checkout: NodeCheckout, env: dict[str, str]) -> Path:
    """Clone the commit, lay the flow's metafiles over it, point DVC at the remote and a node-wide cache, and pull
    the stage's dependencies. Returns the checkout's folder."""
    scratch = node_scratch()
    folder = scratch / f"{checkout.stage.replace('@', '-')}-{checkout.commit[:12]}-{uuid.uuid4().hex[:8]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    _run(["git", "clone", "--quiet", "--no-checkout", checkout.git_url, str(folder)], scratch, env,
         f"cloning the git remote {checkout.git_url}", checkout.stage)
    _run(["git", "checkout", "--quiet", checkout.commit], folder, env,
         f"checking out commit {checkout.commit} (push it to {checkout.git_url} first)", checkout.stage)
    for relative, text in checkout.metafiles.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    dvc = [sys.executable, "-m", "dvc"]
    remote = os.environ.get(REMOTE_URL_ENV) or checkout.dvc_remote
    _run([*dvc, "remote", "add", "--local", "--force", "--default", "flow", remote], folder, env,
         "configuring the DVC remote", checkout.stage)
    _run([*dvc, "config", "--local", "cache.dir", str(scratch / "dvc-cache")], folder, env,
         "configuring the node's DVC cache", checkout.stage)
    if checkout.pulls:
        done = subprocess.run([*dvc, "pull", "--quiet", *checkout.pulls], cwd=folder, env=env, capture_output=True,
                              text=True)
        if done.returncode:
            raise RemoteStageFailed(
                f"{checkout.stage} on node {socket.gethostname()}: the DVC remote {remote} cannot give "
                f"the stage's inputs ({', '.join(checkout.pulls)}); nothing was run or committed. Check that the "
                f"node reaches the remote (flow.dvc_remote) and that the flow pushed them: "
                f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return folder


def finish_checkout(checkout: NodeCheckout, folder: Path, env: dict[str, str]) -> dict:
    """Commit the stage in the checkout, push its outputs, and return its lock entry and its git-kept outputs."""
    from ruamel.yaml import YAML

    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "commit", "--force", checkout.stage], folder, env, "committing the stage's outputs",
         checkout.stage)
    done = subprocess.run([*dvc, "push", "--quiet", checkout.stage], cwd=folder, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise RemoteStageFailed(f"{checkout.stage} on node {socket.gethostname()}: pushing its outputs to the DVC "
                                f"remote {checkout.dvc_remote} failed; nothing is committed: "
                                f"{(done.stderr or done.stdout).strip()[-1500:]}")
    # YAML 1.2, as DVC writes it (PyYAML would read `1e-06` as a string)
    entry = YAML(typ="safe").load((folder / "dvc.lock").read_text())["stages"][checkout.stage]
    git_kept = {}
    for out in _uncached_outs(folder, checkout.stage):
        path = folder / out
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            git_kept[file.relative_to(folder).as_posix()] = base64.b64encode(file.read_bytes()).decode()  # as is
    return {"lock": entry, "git_kept": git_kept}


def _uncached_outs(folder: Path, stage: str) -> list[str]:
    """The stage's outputs DVC does not cache (`cache: false`), as paths in the repo."""
    code = ("import json, sys\nfrom dvc.repo import Repo\nwith Repo('.') as repo:\n"
            f"    (stage,) = repo.stage.collect({stage!r})\n"
            "    print(json.dumps([o.def_path for o in stage.outs if not o.use_cache]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def audit_env(folder: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """The environment of the stage's processes on a node: the checkout's code first on PYTHONPATH, and a
    sitecustomize that records every path they open."""
    hook = folder / ".braintumor-audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK.format(record=OPEN_RECORD_ENV))
    record = folder / ".braintumor-audit" / "opened.txt"
    paths = [str(hook), str(folder), env.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p), OPEN_RECORD_ENV: str(record)}, record


def opened_paths(record: Path) -> list[str]:
    return sorted(set(record.read_text().splitlines())) if record.exists() else []


# ------------------------------------------------------------------------------------------------- the flow's side

def is_tracking_server(uri: str) -> bool:
    """Whether an MLflow tracking URI names a server (which every node can reach), not a file or database path."""
    from urllib.parse import urlsplit

    return urlsplit(uri).scheme in ("http", "https", "databricks")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise ProjectError(f"`git {' '.join(args)}` failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip()


def run_commit(root: Path, git_remote: str) -> tuple[str, str]:
    """(HEAD's commit, the git remote's URL), once HEAD is known to be on that remote and no tracked file but the
    DVC metafiles the flow sends differs from it: a node's checkout is then the flow's code."""
    commit = _git(root, "rev-parse", "HEAD")
    url = _git(root, "remote", "get-url", git_remote)
    if Path(url).exists():
        url = str(Path(url).resolve())
    _git(root, "fetch", "--quiet", git_remote)
    if not _git(root, "branch", "--remotes", "--contains", commit):
        raise ProjectError(f"commit {commit[:12]} is not on the git remote {git_remote} ({url}): the cluster's nodes "
                           f"check it out from there; `git push {git_remote}` it first")
    changed = [line.split(maxsplit=1)[1] for line in
               _git(root, "status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    stray = [path for path in changed if not (path in ("dvc.lock", "params.yaml") or path.endswith(METAFILE_SUFFIXES))]
    if stray:
        raise ProjectError(f"{', '.join(stray)} differ from commit {commit[:12]}, which is what the cluster's nodes run: "
                           "commit and push them first")
    return commit, url


def dvc_remote_url(root: Path, name: str | None) -> str:
    """The DVC remote's URL (a local path made absolute against the repo), by name or the repo's default."""
    code = ("import json\nfrom dvc.repo import Repo\nwith Repo('.') as repo:\n"
            f"    name = {name!r} or repo.config['core'].get('remote')\n"
            "    print(json.dumps([name, repo.config['remote'].get(name, {}).get('url') if name else None]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    found, url = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else (name, None)
    if not url:
        raise ProjectError(f"no DVC remote {'named ' + name if name else '(no default)'} in {root}: the cluster's "
                           "nodes take their inputs from it; `dvc remote add -d NAME URL`, or set flow.dvc_remote")
    if "://" not in url and not Path(url).is_absolute():
        url = str((root / ".dvc" / url).resolve())  # DVC resolves a relative remote path against .dvc/
    return url


def push_inputs(root: Path, deps: list[str], dvc_remote_name: str | None) -> None:
    """Push the dependencies remote stages will pull (outputs of stages the flow ran here) to the DVC remote."""
    if not deps:
        return
    remote = ["--remote", dvc_remote_name] if dvc_remote_name else []
    done = subprocess.run([sys.executable, "-m", "dvc", "push", "--quiet", *remote, *deps], cwd=root,
                          capture_output=True, text=True)
    if done.returncode:
        raise RemoteStageFailed(f"pushing {', '.join(deps)} to the DVC remote {dvc_remote_name or '(the default)'} "
                                f"failed, so no node could pull them: {(done.stderr or done.stdout).strip()[-1500:]}")


def node_checkout(root: Path, stage: str, deps: list[str], commit: str, git_url: str, dvc_remote: str
                  ) -> NodeCheckout:
    """The NodeCheckout of one stage: the metafiles as they are now, and its dependencies DVC tracks."""
    metafiles = {name: (root / name).read_text() for name in ("dvc.lock", "params.yaml") if (root / name).exists()}
    for path in _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "*.dvc").splitlines():
        metafiles[path] = (root / path).read_text()  # committed or not: `data import` leaves data/raw.dvc to commit
    return NodeCheckout(stage, commit, git_url, dvc_remote, metafiles, tuple(deps))


def tracked_dependencies(root: Path, stage: str) -> list[str]:
    """The stage's dependencies that DVC tracks (outputs of other stages, or `.dvc` files): what a node pulls."""
    code = ("import json\nfrom dvc.repo import Repo\nwith Repo('.') as repo:\n"
            f"    (stage,) = repo.stage.collect({stage!r})\n"
            "    outs = {str(o.fs_path) for s in repo.index.stages for o in s.outs}\n"
            "    print(json.dumps([d.def_path for d in stage.deps if hasattr(d, 'fs_path') and str(d.fs_path) in outs]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_inputs(entry: dict, started_with: dict[str, str]) -> list[str]:
    """The dependencies and params whose values in a node's lock entry differ from what the flow sent (empty: the
    node ran on exactly the flow's inputs). `started_with` is flows.dvc_stages.dependency_fingerprints' record."""
    differ = []
    for dep in entry.get("deps", []):
        value = dep.get("md5") or dep.get("hash") or dep.get("etag")
        if dep["path"] in started_with and started_with[dep["path"]] != value:
            differ.append(dep["path"])
    for file, values in entry.get("params", {}).items():
        key = next((k for k in started_with if k.startswith(f"{file} (")), None)
        if key is not None and json.loads(started_with[key]) != values:
            differ.append(key)
    return differ


def land(root: Path, stage: str, result: dict, started_with: dict[str, str], dvc_remote_name: str | None) -> None:
    """Bring a node's stage home: check its inputs, write its lock entry into dvc.lock and its git-kept outputs into
    the workspace, and check its cached outputs out from the DVC remote. Nothing is written when a check fails."""
    from ruamel.yaml import YAML

    differ = same_inputs(result["lock"], started_with)
    if differ:
        raise RemoteStageFailed(f"{stage} ran on other inputs than the flow sent ({', '.join(differ)}): its outputs "
                                "were not committed. Run the flow again once they are settled")
    yaml_rt = YAML()
    lock_path = root / "dvc.lock"
    document = yaml_rt.load(lock_path.read_text()) if lock_path.exists() else {"schema": "2.0", "stages": {}}
    document.setdefault("stages", {})[stage] = result["lock"]
    for relative, encoded in result["git_kept"].items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(base64.b64decode(encoded))
    with lock_path.open("w") as out:
        yaml_rt.dump(document, out)
    remote = ["--remote", dvc_remote_name] if dvc_remote_name else []
    done = subprocess.run([sys.executable, "-m", "dvc", "pull", "--quiet", *remote, stage], cwd=root,
                          capture_output=True, text=True)
    if done.returncode:
        raise RemoteStageFailed(f"{stage}: its outputs could not be checked out from the DVC remote "
                                f"{dvc_remote_name or '(the default)'}: {(done.stderr or done.stdout).strip()[-1500:]}")
