"""The DVC pipeline on a fresh repo: import, `dvc repro`, then a second `dvc repro` runs nothing."""

import json
import subprocess

import pandas as pd


def sh(*args, cwd):
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_import_then_repro_then_nothing_changes(project, real_sample):
    sh("braintumor", "data", "import", "--source", str(real_sample), cwd=project)
    # Only the data-set stages: later stages train models.
    sh("dvc", "repro", "split", cwd=project)

    report = json.loads((project / "reports" / "split.json").read_text())
    assert report["removed_from_training"]["exact_copy_of_test"] >= 1
    train, val, test = (pd.read_csv(project / "data" / "splits" / f"{s}.csv") for s in ("train", "val", "test"))
    assert not pd.concat([train, val]).content_hash.isin(set(test.content_hash)).any()
    assert (project / "reports" / "validation" / "index.html").exists()

    second = sh("dvc", "repro", "split", cwd=project)
    assert "didn't change, skipping" in second and "Running stage" not in second
