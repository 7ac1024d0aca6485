import zipfile

import pytest

from components.data_import import ImportFailed, data_hash, import_dataset
from tests.conftest import tree_digest


def test_import_folder_twice_gives_the_same_hash_and_skips_hidden_files(project, tiny_dataset):
    hidden = tiny_dataset / "Testing" / "glioma" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "Te-gl_0000-checkpoint.jpg").write_bytes(b"stray")
    before = tree_digest(tiny_dataset)

    first = import_dataset(str(tiny_dataset), project / "data" / "raw")
    second = import_dataset(str(tiny_dataset), project / "data" / "raw")

    assert first["files"] == 4 * 14
    assert first["dvc_hash"] and first["dvc_hash"] == second["dvc_hash"]
    assert data_hash(project / "data" / "raw.dvc") == first["dvc_hash"]
    assert not list((project / "data" / "raw").rglob(".ipynb_checkpoints"))
    assert tree_digest(tiny_dataset) == before, "the source must never be written to"


def test_import_zip_with_nested_root(project, tiny_dataset, tmp_path):
    archive = tmp_path / "brain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_dataset.rglob("*.jpg"):
            zf.write(path, "brain-tumor-mri/" + str(path.relative_to(tiny_dataset)))
    result = import_dataset(str(archive), project / "data" / "raw", run_dvc_add=False)
    assert result["files"] == 4 * 14
    assert (project / "data" / "raw" / "Training" / "pituitary").is_dir()


def test_kaggle_without_credentials_says_what_is_missing(project, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    with pytest.raises(ImportFailed, match="(Kaggle credentials|Kaggle client is not installed)"):
        import_dataset("kaggle:masoudnickparvar/brain-tumor-mri-dataset", project / "data" / "raw")
    assert not (project / "data" / "raw").exists()


def test_folder_without_kaggle_layout_is_refused(project, tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(ImportFailed, match="Kaggle layout"):
        import_dataset(str(tmp_path / "flat"), project / "data" / "raw")
