"""A fresh clone reproduces without retraining: push the trained tiny pipeline to a DVC remote, clone the git repo
anew, `dvc pull`, and DVC must find every stage up to date."""

import subprocess


def sh(*command, cwd) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_clone_push_clone_pull_is_up_to_date_and_repro_runs_nothing(trained_copy, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "scratch", str(remote), cwd=trained_copy)
    sh("git", "commit", "-q", "-am", "remote", cwd=trained_copy)
    sh("dvc", "push", cwd=trained_copy)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(trained_copy), str(clone), cwd=tmp_path)
    assert not (clone / "models").exists(), "models come from the DVC remote, not from git"
    sh("dvc", "pull", cwd=clone)

    assert "up to date" in sh("dvc", "status", cwd=clone)
    repro = sh("dvc", "repro", cwd=clone)
    assert "Running stage" not in repro, repro
    assert (clone / "models" / "custom_cnn" / "mlflow.json").exists()
    assert (clone / "reports" / "evaluation.md").exists()
