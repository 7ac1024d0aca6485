import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import flows.cli as cli
from components.config import Params, load_params
from components.data_append import Labels, append_dataset
from components.data_import import ImportFailed, data_hash, import_dataset
from components.manifest import write_manifest
from flows.dvc_stages import commit_unchanged, dependency_fingerprints, pipeline_generations, stale_stages
from tests.conftest import CLASSES, tree_digest, write_tiny_dataset


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


# --- `braintumor data import --source NEW --append` -------------------------------------------------------------

def smooth_scan(seed: int, size: int = 64) -> Image.Image:
    """A structured toy scan (a smooth random field): unlike the noisy class images, whose flat background makes
    dhash bits fragile, a brightened re-encoding of it stays within a few bits, as real scans do."""
    low = np.random.default_rng(seed).uniform(40, 200, (9, 9)).astype(np.uint8)
    return Image.fromarray(low, mode="L").resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture
def imported(project, tiny_dataset) -> Params:
    """The project with the tiny data set imported and `dvc add`-ed; its own params (paths relative to it)."""
    smooth_scan(1).save(tiny_dataset / "Testing" / "glioma" / "Te-gl_smooth.jpg", quality=95)
    import_dataset(str(tiny_dataset), project / "data" / "raw")
    return load_params(project / "params.yaml")


def training_files(project, label: str) -> list[str]:
    return sorted(p.name for p in (project / "data" / "raw" / "Training" / label).iterdir())


def test_append_makes_a_new_data_version_and_the_pipeline_stale(imported, project, tmp_path):
    raw, dvc_file = project / "data" / "raw", project / "data" / "raw.dvc"
    # The manifest stage up to date, as a finished flow run leaves it (the flow's own commit).
    started = dependency_fingerprints(["manifest"], project)["manifest"]
    write_manifest(imported.paths.raw, imported.paths.manifest, imported.manifest)
    commit_unchanged("manifest", started, project)
    assert stale_stages(["manifest"], project) == []
    old_hash = data_hash(dvc_file)
    new = write_tiny_dataset(tmp_path / "new", {"Training": 3}, seed=7)  # NEW/Training/<class>/

    result = append_dataset(new, imported)

    assert result["added"] == dict.fromkeys(CLASSES, 3) and result["appended"] == 12
    assert result["skipped_already_present"] == dict.fromkeys(CLASSES, 0)
    assert result["old_dvc_hash"] == old_hash and result["dvc_hash"] == data_hash(dvc_file) != old_hash
    assert result["test_hashes_from"].startswith("manifest"), "the committed manifest is current for Testing"
    for label in CLASSES:
        names = training_files(project, label)
        assert len(names) == 10 + 3 and sum(n.startswith("Ad-") for n in names) == 3
        assert len(list((raw / "Testing" / label).iterdir())) == 4 + (label == "glioma"), "Testing is never grown"
    # DVC sees new data: the flow's first generation (manifest) is stale, and every later stage, the trainings
    # among them, reads what it writes.
    assert stale_stages(["manifest"], project) == ["manifest"]
    generations = [[s.name for s in g] for g in pipeline_generations(project)]
    assert generations[0] == ["manifest"] and any("train@custom_cnn" in g for g in generations[1:])
    rebuilt = write_manifest(imported.paths.raw, imported.paths.manifest, imported.manifest)
    appended = rebuilt[rebuilt.path.str.contains("/Ad-")]
    assert len(appended) == 12 and set(appended.official_split) == {"train"} and appended.readable.all()
    assert appended.label.value_counts().to_dict() == dict.fromkeys(CLASSES, 3)


def test_a_near_duplicate_of_a_test_image_is_refused_and_nothing_is_appended(imported, project, tmp_path):
    raw, dvc_file = project / "data" / "raw", project / "data" / "raw.dvc"
    twin = raw / "Testing" / "glioma" / "Te-gl_smooth.jpg"
    new = tmp_path / "new"
    (new / "glioma").mkdir(parents=True)
    ImageEnhance.Brightness(Image.open(twin)).enhance(1.1).save(new / "glioma" / "brightened.jpg", quality=85)
    smooth_scan(2).save(new / "glioma" / "fine.jpg", quality=95)
    assert (new / "glioma" / "brightened.jpg").read_bytes() != twin.read_bytes()
    before, old_hash = tree_digest(raw), data_hash(dvc_file)

    with pytest.raises(ImportFailed) as refused:
        append_dataset(new, imported)

    message = str(refused.value)
    line = next(line for line in message.splitlines() if "brightened.jpg" in line)
    assert "near duplicate of test image data/raw/Testing/glioma/Te-gl_smooth.jpg" in line
    assert "fine.jpg" not in message, "only the twin is refused"
    assert "1 of 2 file(s)" in message and "nothing was appended" in message and "near_duplicate_distance" in message
    assert tree_digest(raw) == before and data_hash(dvc_file) == old_hash
    assert not list(raw.parent.glob(".append-*")), "the scratch folder is removed"


def test_unknown_class_and_invalid_files_are_refused_each_with_its_reason(imported, project, tmp_path):
    raw, dvc_file = project / "data" / "raw", project / "data" / "raw.dvc"
    new = tmp_path / "new"
    for folder in ("glioma", "astrocytoma", "Testing/glioma"):
        (new / folder).mkdir(parents=True)
    smooth_scan(3).save(new / "glioma" / "fine.jpg")
    smooth_scan(4).save(new / "astrocytoma" / "unknown.jpg")
    smooth_scan(5, size=16).save(new / "glioma" / "small.jpg")  # below validate.min_side (32)
    (new / "glioma" / "broken.jpg").write_bytes((new / "glioma" / "fine.jpg").read_bytes()[:200])
    smooth_scan(6).save(new / "Testing" / "glioma" / "test.jpg")
    (new / "loose.jpg").write_bytes((new / "glioma" / "fine.jpg").read_bytes())
    before, old_hash = tree_digest(raw), data_hash(dvc_file)

    with pytest.raises(ImportFailed) as refused:
        append_dataset(new, imported)

    reasons = {line.split(": ", 1)[0].strip(): line for line in str(refused.value).splitlines()
               if line.startswith("  ") and ": " in line}
    assert "unknown class 'astrocytoma'" in reasons[str(new / "astrocytoma" / "unknown.jpg")]
    assert "column='width'" in reasons[str(new / "glioma" / "small.jpg")]
    assert "corrupt image" in reasons[str(new / "glioma" / "broken.jpg")]
    assert "Testing" in reasons[str(new / "Testing" / "glioma" / "test.jpg")]
    assert "class folder" in reasons[str(new / "loose.jpg")]
    assert str(new / "glioma" / "fine.jpg") not in reasons
    assert "5 of 6 file(s)" in str(refused.value) and "glioma, meningioma, notumor, pituitary" in str(refused.value)
    assert tree_digest(raw) == before and data_hash(dvc_file) == old_hash


def test_appending_twice_adds_nothing_the_second_time(imported, project, tmp_path, capsys):
    new = write_tiny_dataset(tmp_path / "new", {"Training": 2}, seed=5)
    for label in CLASSES:  # NEW/<class>/ layout, as well as NEW/Training/<class>/
        (new / "Training" / label).rename(new / label)
    (new / "Training").rmdir()
    kaggle_copy = project / "data" / "raw" / "Training" / "glioma" / "Tr-gl_0000.jpg"
    shutil.copy2(kaggle_copy, new / "glioma" / "already-there.jpg")  # a Kaggle training file: present already

    def append() -> dict:
        assert cli.main(["data", "import", "--source", str(new), "--append"]) == 0
        return json.loads(capsys.readouterr().out)

    first = append()
    files = sorted(p.name for p in (project / "data" / "raw").rglob("*"))
    second = append()

    assert first["added"] == dict.fromkeys(CLASSES, 2) and first["new_version"]
    assert first["skipped_already_present"] == {"glioma": 1, "meningioma": 0, "notumor": 0, "pituitary": 0}
    assert second["appended"] == 0 and second["added"] == dict.fromkeys(CLASSES, 0) and not second["new_version"]
    assert second["skipped_already_present"] == {"glioma": 3, "meningioma": 2, "notumor": 2, "pituitary": 2}
    assert second["dvc_hash"] == second["old_dvc_hash"] == first["dvc_hash"] == data_hash(
        project / "data" / "raw.dvc")
    assert "nothing appended" in second["message"]
    assert sorted(p.name for p in (project / "data" / "raw").rglob("*")) == files
    assert len(training_files(project, "glioma")) == 10 + 2


def test_the_same_scan_under_two_classes_is_refused(imported, project, tmp_path):
    new = tmp_path / "new"
    for label in ("glioma", "meningioma"):
        (new / label).mkdir(parents=True)
        smooth_scan(8).save(new / label / "scan.jpg")  # same bytes, two labels
    kaggle = project / "data" / "raw" / "Training" / "notumor" / "Tr-no_0000.jpg"
    shutil.copy2(kaggle, new / "glioma" / "relabelled.jpg")  # a Kaggle notumor scan, labelled glioma
    old_hash = data_hash(project / "data" / "raw.dvc")

    with pytest.raises(ImportFailed, match="3 of 3 file") as refused:
        append_dataset(new, imported)

    message = str(refused.value)
    assert f"{new / 'glioma' / 'scan.jpg'}: labelled glioma, but the same bytes are also at" in message
    assert f"{new / 'meningioma' / 'scan.jpg'}: labelled meningioma" in message
    assert "data/raw/Training/notumor/Tr-no_0000.jpg (notumor)" in message
    assert data_hash(project / "data" / "raw.dvc") == old_hash


# --- appending from a labels file (another collection, by weighting) ----------------------------------------------

def labelled_collection(folder, rows: list[tuple[str, str, str | None, str | None]], seed: int = 100):
    """A collection laid out by pathology and weighting, with labels.csv (file, label, weighting, pathology, group):
    one smooth scan per row (file, label, weighting, group)."""
    import pandas as pd

    for n, (file, *_rest) in enumerate(rows):
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        smooth_scan(seed + n).save(folder / file, quality=95)
    pd.DataFrame([{"file": f, "label": label, "weighting": w or "", "pathology": "x", "group": g or ""}
                  for f, label, w, g in rows]).to_csv(folder / "labels.csv", index=False)
    return folder


COLLECTION = [("Glioma T2/a.jpg", "glioma", "T2", "1"), ("Glioma T2/b.jpg", "glioma", "T2", "1"),
              ("Glioma T2/c.jpg", "glioma", "T2", "1"), ("Meningioma T1C+/d.jpg", "meningioma", "T1C+", "2"),
              ("Normal T1/e.jpg", "notumor", "T1", "3"), ("Normal T1/f.jpg", "notumor", "T1", "3"),
              ("Schwannoma T2/g.jpg", "other_tumor", "T2", "4")]


def test_append_from_a_labels_file_records_provenance_keeps_groups_whole_and_never_trains_other_tumor(
        imported, project, tmp_path):
    import pandas as pd

    from components.split import make_splits

    source = labelled_collection(tmp_path / "feltrin", COLLECTION)

    with pytest.raises(ImportFailed) as refused:  # without --classes, other_tumor is refused, all or nothing
        append_dataset(source, imported, Labels(Path("labels.csv"), None))
    assert "Schwannoma T2/g.jpg: labelled 'other_tumor', not a class of params data.classes" in str(refused.value)
    assert "--classes glioma,meningioma,notumor,pituitary" in str(refused.value)
    assert not (project / "data" / "raw" / "provenance.csv").exists()
    with pytest.raises(ImportFailed, match="other_tumor is not a class of params data.classes"):
        append_dataset(source, imported, Labels(Path("labels.csv"), ("glioma", "other_tumor")))

    result = append_dataset(source, imported, Labels(Path("labels.csv"), ("glioma", "meningioma", "notumor")),
                            "feltrin")

    assert result["added"] == {"glioma": 3, "meningioma": 1, "notumor": 2, "pituitary": 0}
    assert result["left_out_by_classes"] == {"other_tumor": 1}
    manifest = write_manifest(imported.paths.raw, imported.paths.manifest, imported.manifest)
    appended = manifest[manifest.source == "feltrin"]
    assert len(appended) == 6 and set(manifest.source) == {"kaggle", "feltrin"}
    assert manifest[manifest.source == "kaggle"].weighting.isna().all(), "Kaggle states no weighting"
    assert appended.groupby("label").weighting.agg(set).to_dict() == {
        "glioma": {"T2"}, "meningioma": {"T1C+"}, "notumor": {"T1"}}, "each scan keeps the weighting it states"
    assert set(appended.source_group) == {"feltrin:1", "feltrin:2", "feltrin:3"}
    assert not manifest.path.str.contains("g.jpg").any()

    # The split stage keeps each stated group whole, though its scans are far apart in dhash.
    quarantine = pd.DataFrame(columns=["path", "label", "reason"])
    params = imported.split.model_copy(update={"val_fraction": 0.3, "stack_fraction": 0.2, "gate_fraction": 0.2})
    splits, report, _ = make_splits(manifest, quarantine, imported.paths.raw, params, seed=3)
    assert report["counts_by_source"]["test"] == {"kaggle": len(splits["test"])}, "Testing stays Kaggle's only"
    where = {row.path: name for name, frame in splits.items() for row in frame.itertuples()}
    groups = manifest.dropna(subset=["source_group"]).assign(
        split=lambda m: [where[(imported.paths.raw / p).as_posix()] for p in m.path])
    assert (groups.groupby("source_group").split.nunique() == 1).all(), groups[["source_group", "split"]]


def test_a_labels_file_row_that_twins_a_test_image_is_refused(imported, project, tmp_path):
    import pandas as pd

    source = tmp_path / "collection"
    twin = project / "data" / "raw" / "Testing" / "glioma" / "Te-gl_smooth.jpg"
    (source / "Glioma T1").mkdir(parents=True)
    ImageEnhance.Brightness(Image.open(twin)).enhance(1.1).save(source / "Glioma T1" / "x.jpg", quality=85)
    pd.DataFrame([{"file": "Glioma T1/x.jpg", "label": "glioma", "weighting": "T1"}]).to_csv(
        source / "labels.csv", index=False)
    with pytest.raises(ImportFailed, match=r"Glioma T1/x.jpg: near duplicate of test image .*Te-gl_smooth.jpg"):
        append_dataset(source, imported, Labels(Path("labels.csv"), None))


def test_the_cli_reads_labels_and_classes_only_with_append(imported, project, tmp_path, capsys):
    source = labelled_collection(tmp_path / "feltrin", COLLECTION[:2])
    assert cli.main(["data", "import", "--source", str(source), "--labels", "labels.csv"]) == 1
    assert "--labels, --classes and --source-name go with --append" in capsys.readouterr().err
    assert cli.main(["data", "import", "--source", str(source), "--append", "--labels", "labels.csv",
                     "--classes", "glioma"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source_name"] == "feltrin" and out["added"]["glioma"] == 2
