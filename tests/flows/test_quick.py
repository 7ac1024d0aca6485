"""`braintumor quick`: the main job's own commands on a sample, in a scratch worktree of HEAD, marked smoke."""

import shlex
import subprocess

from components.config import load_params
from flows.quick import fresh_worktree, quick_commands
from tests.conftest import ROOT, git_dvc_repo


def test_the_quick_profile_runs_the_main_jobs_commands_with_its_overrides():
    params = load_params(ROOT / "params.yaml")
    steps = quick_commands(params, ROOT)
    commands = [shlex.split(command) for _, command in steps]
    assert commands[0][:3] == ["braintumor", "data", "import"] and "--sample" in commands[0]
    assert commands[-1] == ["braintumor", "report"]
    (train,) = [c for c in commands if c[-2:] == ["flow", "train"]]
    overrides = [train[i + 1] for i, word in enumerate(train) if word == "-S"]
    assert overrides == params.quick.overrides and "tracking.smoke=true" in overrides
    load_params(ROOT / "params.yaml", overrides)  # every override names a real key with a valid value
    externals = [c[c.index("--source") + 1] for c in commands if "evaluate-external" in c]
    assert externals == [str((ROOT / p).resolve()) for p in params.quick.external]
    if params.quick.append:
        (append,) = [c for c in commands if "--append" in c]
        assert append[append.index("--classes") + 1].split(",") == params.quick.append_classes


def test_the_scratch_checkout_is_head_made_afresh(tmp_path):
    repo = git_dvc_repo(tmp_path / "repo", {"a.txt": "committed\n"})
    for command in (["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=repo, check=True)
    (repo / "a.txt").write_text("uncommitted\n")
    tree = repo / ".quick"
    fresh_worktree(repo, tree)
    (tree / "left-over.txt").write_text("from a previous quick run\n")
    fresh_worktree(repo, tree)
    assert (tree / "a.txt").read_text() == "committed\n", "the committed code, not the working copy"
    assert not (tree / "left-over.txt").exists()
