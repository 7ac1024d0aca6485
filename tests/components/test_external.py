"""`braintumor evaluate-external`: layouts, the exclusion of the Kaggle set's duplicates, and metrics checked
against values computed here by hand (a stub scorer whose probabilities the test chooses), plus one run of the real
EnsembleModel on the session's tiny trained workspace."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
from statistics import NormalDist

import imagehash
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

import flows.cli as cli
from components.config import ProjectError, load_params
from components.external import detect_layout, run_external
from components.predict import IMAGE_COLUMN, BadInput, Limits, load_pyfunc
from tests.conftest import CLASSES, ROOT, class_image

MODELS = ["a", "b", "soft_vote", "stack"]
NOTUMOR = CLASSES.index("notumor")


def drawn_scan(seed: int, size: int = 96) -> Image.Image:
    """A smooth random grey image (tilted gradient plus Gaussian blobs): distinct seeds are far apart in dhash."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    field = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
    for _ in range(6):
        cy, cx = rng.uniform(0, 1, 2)
        width = rng.uniform(0.05, 0.3)
        field = field + rng.uniform(-2, 2) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width ** 2))
    field = (field - field.min()) / (field.max() - field.min())
    return Image.fromarray((20 + 200 * field).astype(np.uint8), "L")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(image: Image.Image, path, quality: int = 95) -> str:
    """Save as JPEG; the sha256 of the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=quality)
    return sha(path.read_bytes())


def probabilities(p_notumor: float, predicted: str = "glioma") -> np.ndarray:
    """Class probabilities with P(notumor) = p_notumor; the rest goes mostly to `predicted` (a tumor class)."""
    vector = np.zeros(len(CLASSES))
    vector[NOTUMOR] = p_notumor
    others = [i for i in range(len(CLASSES)) if i != NOTUMOR]
    for i in others:
        vector[i] = (1 - p_notumor) * (0.8 if CLASSES[i] == predicted else 0.1)
    return vector


class StubScorer:
    """Stands in for EnsembleModel: the probabilities of each image (found by the sha256 of its bytes) are the
    test's; a row whose image is in `refuse` is refused as the real model refuses bad rows (BadInput, by row)."""

    classes = CLASSES

    def __init__(self, table: dict[str, dict[str, np.ndarray]], refuse: set[str] = frozenset(), max_rows: int = 3):
        self.table, self.refuse = table, set(refuse)
        self.limits = Limits(max_rows=max_rows, max_image_bytes=10**7, max_image_pixels=10**8)
        self.seen: list[str] = []

    def component_probabilities(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        assert 0 < len(frame) <= self.limits.max_rows
        keys = [sha(base64.b64decode(value)) for value in frame[IMAGE_COLUMN]]
        bad = {row: "refused by the stub" for row, key in enumerate(keys) if key in self.refuse}
        if bad:
            raise BadInput(f"{len(bad)} rows cannot be scored", bad)
        self.seen += keys
        return {model: np.array([self.table[key][model] for key in keys]) for model in MODELS}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow sqlite store for the module (creating one costs seconds)."""
    return tmp_path_factory.mktemp("external-mlflow")


@pytest.fixture
def kaggle(tmp_path, monkeypatch, store):
    """cwd = a workspace whose data/raw holds 16 drawn scans (2 per class and official split) and whose
    data/manifest.parquet is the manifest stage's; returns (params, {raw relative path: image})."""
    from components.manifest import write_manifest

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(ROOT / "params.yaml", [
        "manifest.workers=1", f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_root={store / 'artifacts'}"])
    images = {}
    seed = 1000
    for split in ("Training", "Testing"):
        for label in CLASSES:
            for n in range(2):
                seed += 1
                relative = f"{split}/{label}/{split[:2]}-{label[:2]}_{n}.jpg"
                images[relative] = drawn_scan(seed)
                save(images[relative], params.paths.raw / relative)
    write_manifest(params.paths.raw, params.paths.manifest, params.manifest)
    return params, images


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval, from its formula."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def pairwise_auc(tumor_scores: list[float], healthy_scores: list[float]) -> float:
    """ROC-AUC as the share of (tumor, healthy) pairs ranked right, ties counting half."""
    pairs = [(t > h) + 0.5 * (t == h) for t in tumor_scores for h in healthy_scores]
    return sum(pairs) / len(pairs)


def assert_proportion(figure: dict, k: int, n: int) -> None:
    assert (figure["k"], figure["n"]) == (k, n)
    assert figure["value"] == pytest.approx(k / n)
    low, high = wilson(k, n)  # every figure here rests on fewer than external.interval_below (100) scans
    assert (figure["ci_low"], figure["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_binary_yes_no_metrics_match_hand_computed_values(kaggle):
    params, _ = kaggle
    source = params.paths.raw.parent.parent / "ext"
    # (folder, tumor score of model `a`, of the stack); 0.5 is on the threshold: called tumor.
    scans = [("yes", 0.9, 0.9), ("yes", 0.8, 0.7), ("yes", 0.4, 0.5), ("yes", 0.3, 0.45), ("yes", 0.6, 0.2),
             ("yes", 0.7, 0.95), ("no", 0.2, 0.1), ("no", 0.55, 0.6), ("no", 0.1, 0.3)]
    table = {}
    for n, (folder, score_a, score_stack) in enumerate(scans):
        key = save(drawn_scan(n), source / folder / f"scan_{n}.jpg")
        table[key] = {"a": probabilities(1 - score_a), "b": probabilities(0.5), "soft_vote": probabilities(0.5),
                      "stack": probabilities(1 - score_stack)}
    refused = save(drawn_scan(99), source / "yes" / "refused.jpg")
    (source / "no" / "notes.jpg").write_text("not a scan")
    (source / "README.md").write_text("files beside the class folders are ignored")

    stub = StubScorer(table, refuse={refused})
    result = run_external(params, source, scorer=stub)

    report = json.loads((params.external.out_dir / "ext.json").read_text())
    assert result["json"] == str(params.external.out_dir / "ext.json") and report["layout"] == "yes/no"
    assert report["counts"] == {"found": 11, "dropped": 0, "unreadable": 2, "scored": 9, "scored_tumor": 6,
                                "scored_healthy": 3, "scored_by_weighting": {}, "scored_held_out": {}}
    assert {u["file"]: u["error"] for u in report["unreadable"]} == {
        "yes/refused.jpg": "refused by the stub", "no/notes.jpg": "not an image (PIL cannot identify the format)"}
    assert sorted(stub.seen) == sorted(table)  # every other scan was scored, once
    for model, column in (("a", 1), ("stack", 2)):
        tumor = [s[column] for s in scans if s[0] == "yes"]
        healthy = [s[column] for s in scans if s[0] == "no"]
        figures = report["metrics"][model]
        assert_proportion(figures["tumor_sensitivity"], sum(s >= 0.5 for s in tumor), len(tumor))
        assert_proportion(figures["tumor_specificity"], sum(s < 0.5 for s in healthy), len(healthy))
        assert figures["tumor_roc_auc"]["value"] == pytest.approx(pairwise_auc(tumor, healthy))
        assert (figures["tumor_roc_auc"]["n_tumor"], figures["tumor_roc_auc"]["n_healthy"]) == (6, 3)
    assert report["metrics"]["stack"]["tumor_sensitivity"]["k"] == 4  # 0.9, 0.7, 0.5 and 0.95
    assert "accuracy" not in report["metrics"]["stack"]  # no 4-class figures without 4-class labels

    markdown = (params.external.out_dir / "ext.md").read_text()
    assert "| stack | 66.7% (4/6; 95% CI " in markdown and "`no/notes.jpg`" in markdown
    assert "`yes/refused.jpg` | refused by the stub" in markdown

    run = mlflow.get_run(result["run_id"])
    assert run.info.run_name == "external-ext" and run.data.tags["stage"] == "evaluate-external"
    assert run.data.metrics["stack.tumor_sensitivity"] == pytest.approx(4 / 6)
    assert run.data.metrics["count.unreadable"] == 2 and run.data.params["source"] == str(source.resolve())
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(result["run_id"], "external")}
    assert logged == {"external/ext.md", "external/ext.json"}


@pytest.mark.parametrize("under", ["", "Testing"])
def test_kaggle_layout_gives_four_class_accuracy_and_recall(kaggle, under):
    params, _ = kaggle
    source = params.paths.raw.parent.parent / "kaggle-like"
    # (true class, predicted class, P(notumor)); no pituitary folder at all.
    scans = [("glioma", "glioma", 0.1), ("glioma", "meningioma", 0.2), ("glioma", "notumor", 0.9),
             ("meningioma", "meningioma", 0.05), ("meningioma", "meningioma", 0.3),
             ("notumor", "notumor", 0.8), ("notumor", "glioma", 0.4)]
    table = {}
    for n, (label, predicted, p_notumor) in enumerate(scans):
        key = save(drawn_scan(200 + n), source / under / label / f"{n}.jpg")
        vector = probabilities(p_notumor, predicted if predicted != "notumor" else "glioma")
        table[key] = dict.fromkeys(MODELS, vector)
    report_name = f"kaggle-{under or 'top'}"

    run_external(params, source, name=report_name, scorer=StubScorer(table))

    report = json.loads((params.external.out_dir / f"{report_name}.json").read_text())
    assert report["layout"] == "kaggle" and report["counts"]["scored_pituitary"] == 0
    figures = report["metrics"]["stack"]
    predicted = {n: CLASSES[int(np.argmax(table[k]["stack"]))] for n, k in enumerate(table)}
    assert [predicted[n] for n in range(len(scans))] == [s[1] for s in scans]  # the vectors say what we meant
    assert_proportion(figures["accuracy"], sum(s[0] == s[1] for s in scans), len(scans))
    for label in ("glioma", "meningioma", "notumor"):
        rows = [s for s in scans if s[0] == label]
        assert_proportion(figures[f"recall_{label}"], sum(s[1] == label for s in rows), len(rows))
    assert figures["recall_pituitary"] == {"value": None, "note": "n/a (no pituitary scans)"}
    tumor = [s for s in scans if s[0] != "notumor"]
    assert_proportion(figures["tumor_sensitivity"], sum(1 - s[2] >= 0.5 for s in tumor), len(tumor))
    markdown = (params.external.out_dir / f"{report_name}.md").read_text()
    assert "## Four classes" in markdown and "n/a (no pituitary scans)" in markdown
    assert (f"`{under}/glioma/0.jpg`" if under else "`glioma/0.jpg`") not in markdown  # nothing was dropped


def test_tumor_notumor_layout_with_tumor_scans_only_says_what_is_not_available(kaggle):
    params, _ = kaggle
    source = params.paths.raw.parent.parent / "only-tumors"
    scores = [0.9, 0.3, 0.6]
    table = {save(drawn_scan(300 + n), source / "tumor" / f"{n}.jpg"): dict.fromkeys(MODELS, probabilities(1 - s))
             for n, s in enumerate(scores)}
    (source / "notumor").mkdir()  # present but empty

    result = run_external(params, source, scorer=StubScorer(table))  # name: the folder's

    report = json.loads((params.external.out_dir / "only-tumors.json").read_text())
    assert report["layout"] == "tumor/notumor" and result["tumor_sensitivity"]["stack"] == pytest.approx(2 / 3)
    assert report["counts"]["scored"] == 3 and report["counts"]["unreadable"] == 0
    figures = report["metrics"]["b"]
    assert_proportion(figures["tumor_sensitivity"], 2, 3)
    assert figures["tumor_specificity"]["note"] == figures["tumor_roc_auc"]["note"] == "n/a (no healthy scans)"
    markdown = (params.external.out_dir / "only-tumors.md").read_text()
    assert "| b | 66.7% (2/3; 95% CI" in markdown and markdown.count("n/a (no healthy scans)") == 2 * len(MODELS)


@pytest.mark.parametrize(("folders", "found"), [
    (["cats", "dogs"], "found sub-folders [cats, dogs]"),
    (["yes", "glioma"], "found sub-folders [glioma, yes]"),
    ([], "found no sub-folders and 1 file(s) at the top"),
    (["Testing/yes"], "Testing/ holds [yes]"),
])
def test_an_unknown_layout_names_the_folder_what_it_holds_and_the_accepted_layouts(tmp_path, folders, found):
    source = tmp_path / "odd"
    source.mkdir()
    (source / "scan.jpg").write_bytes(b"")
    for folder in folders:
        (source / folder).mkdir(parents=True)
    with pytest.raises(ProjectError) as failure:
        detect_layout(source, CLASSES)
    message = str(failure.value)
    assert str(source) in message and found in message
    assert "DIR/yes/ and/or DIR/no/" in message and "DIR/tumor/ and/or DIR/notumor/" in message
    assert "Training/" in message and "glioma, meningioma, notumor, pituitary" in message


def test_exact_and_near_copies_of_any_kaggle_image_are_dropped_and_named(kaggle):
    params, images = kaggle
    source = params.paths.raw.parent.parent / "with-copies"
    exact_of, near_of = "Testing/glioma/Te-gl_0.jpg", "Training/pituitary/Tr-pi_1.jpg"
    (source / "yes").mkdir(parents=True)
    shutil.copy2(params.paths.raw / exact_of, source / "yes" / "copy.jpg")
    original = Image.open(params.paths.raw / near_of)
    save(ImageEnhance.Brightness(original).enhance(1.05), source / "yes" / "brighter.jpg", quality=80)
    distinct = save(drawn_scan(4242), source / "no" / "distinct.jpg")
    # The near copy is another file, within the split stage's twin distance of its original.
    assert sha((source / "yes" / "brighter.jpg").read_bytes()) != sha((params.paths.raw / near_of).read_bytes())
    distance = (imagehash.dhash(original, params.manifest.hash_size)
                - imagehash.dhash(Image.open(source / "yes" / "brighter.jpg"), params.manifest.hash_size))
    assert 0 < distance <= params.split.near_duplicate_distance
    stub = StubScorer({distinct: dict.fromkeys(MODELS, probabilities(0.7))})

    result = run_external(params, source, scorer=stub)

    assert stub.seen == [distinct]  # the model never saw a copy
    assert {k: result["counts"][k] for k in ("found", "dropped", "unreadable", "scored", "scored_tumor",
                                             "scored_healthy")} == {
        "found": 3, "dropped": 2, "unreadable": 0, "scored": 1, "scored_tumor": 0, "scored_healthy": 1}
    report = json.loads((params.external.out_dir / "with-copies.json").read_text())
    dropped = {d["file"]: d for d in report["dropped"]}
    assert dropped["yes/copy.jpg"] == {"file": "yes/copy.jpg", "reason": "exact duplicate of a kaggle image",
                                       "distance": 0,
                                       "workspace_image": f"{params.paths.raw.as_posix()}/{exact_of}"}
    assert dropped["yes/brighter.jpg"] == {"file": "yes/brighter.jpg", "reason": "near duplicate of a kaggle image",
                                           "distance": distance,
                                           "workspace_image": f"{params.paths.raw.as_posix()}/{near_of}"}
    markdown = (params.external.out_dir / "with-copies.md").read_text()
    assert "`yes/copy.jpg` | exact duplicate of a kaggle image" in markdown
    assert "`yes/brighter.jpg` | near duplicate of a kaggle image" in markdown
    assert report["metrics"]["stack"]["tumor_sensitivity"]["note"] == "n/a (no tumor scans)"
    assert_proportion(report["metrics"]["stack"]["tumor_specificity"], 1, 1)


def test_the_cli_only_parses_and_reports_a_user_error_in_one_line(tmp_path, monkeypatch, capsys):
    import components.external

    seen = {}
    monkeypatch.setattr(components.external, "run_external",
                        lambda params, source, model_uri, name: seen.update(source=source, uri=model_uri, name=name))
    params_file = str(ROOT / "params.yaml")
    assert cli.main(["--params", params_file, "evaluate-external", "--source", "ext", "--model-uri",
                     "models:/brain-tumor-ensemble@champion", "--name", "dev"]) == 0
    assert seen == {"source": "ext", "uri": "models:/brain-tumor-ensemble@champion", "name": "dev"}
    monkeypatch.undo()
    (tmp_path / "flat").mkdir()
    assert cli.main(["--params", params_file, "evaluate-external", "--source", str(tmp_path / "flat")]) == 1
    assert "unknown layout" in capsys.readouterr().err


def test_the_real_ensemble_of_the_trained_workspace_scores_as_its_parts_and_the_registry(trained_copy, tmp_path,
                                                                                         monkeypatch):
    """The default model is the workspace's own models/ and stacker (no registry); the registered ensemble gives
    the same figures; each base model's tumor scores are its Keras model's on the training pixels, and the stack's
    are what the served pyfunc answers."""
    import keras

    from components.images import load_rgb

    monkeypatch.chdir(trained_copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(trained_copy / "params.yaml")
    source = tmp_path / "tiny-external" / "Testing"
    raw_test = sorted((params.paths.raw / "Testing" / "glioma").glob("*.jpg"))[0]
    (source / "glioma").mkdir(parents=True)
    shutil.copy2(raw_test, source / "glioma" / "copy.jpg")
    rng = np.random.default_rng(2024)
    for index, label in enumerate(CLASSES):
        for n in range(2):
            save(class_image(index, rng, size=48), source / label / f"new_{n}.jpg")

    local = run_external(params, source.parent, name="local")
    registered = run_external(params, source.parent, "models:/brain-tumor-ensemble@challenger", name="registered")

    assert local["counts"]["dropped"] == 1 and local["counts"]["scored"] == 8
    reports = {name: json.loads((params.external.out_dir / f"{name}.json").read_text())
               for name in ("local", "registered")}
    assert reports["local"]["model"].startswith("workspace models")
    assert reports["registered"]["model"] == "models:/brain-tumor-ensemble@challenger"
    assert reports["local"]["metrics"] == reports["registered"]["metrics"]
    assert set(reports["local"]["metrics"]) == {*params.stack.models, "soft_vote", "stack"}

    scans = reports["local"]["scans"]
    paths = [source.parent / s["file"] for s in scans]
    tumor = np.array([s["tumor"] for s in scans])
    for name in params.stack.models:
        model = keras.models.load_model(params.paths.models / name / "model.keras")
        size = params.model(name).image_size
        expected = 1 - model.predict(np.stack([load_rgb(p, size, params.data.preprocess) for p in paths]).astype(np.float32),
                                     verbose=0)[:, NOTUMOR]
        np.testing.assert_allclose([s["tumor_score"][name] for s in scans], expected, atol=1e-5)
        figure = reports["local"]["metrics"][name]["tumor_sensitivity"]
        assert (figure["k"], figure["n"]) == (int((expected[tumor] >= 0.5).sum()), int(tumor.sum()))
    served = load_pyfunc("models:/brain-tumor-ensemble@challenger").predict(
        pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(p.read_bytes()).decode() for p in paths]}))
    np.testing.assert_allclose([s["tumor_score"]["stack"] for s in scans], 1 - served["prob_notumor"], atol=1e-5)
    assert reports["local"]["metrics"]["stack"]["accuracy"]["n"] == 8


def test_a_labels_file_is_scored_by_weighting_and_only_on_scans_no_model_trained_on(kaggle):
    """labels.csv layout: other_tumor is a tumor outside class accuracy; every stated weighting gets its own cell;
    a duplicate of an appended scan in `train` is dropped with its whole group, a duplicate of one the split held
    out (val) is scored and marked, a duplicate of a Kaggle image is dropped."""
    from components.manifest import write_manifest

    params, images = kaggle
    raw = params.paths.raw
    appended = {"Training/glioma/Ad-gl_train.jpg": drawn_scan(501), "Training/notumor/Ad-no_val.jpg": drawn_scan(502)}
    for relative, image in appended.items():
        save(image, raw / relative)
    pd.DataFrame([{"path": p, "source": "feltrin", "weighting": "T2", "source_group": "feltrin:1", "original": p}
                  for p in appended]).to_csv(raw / "provenance.csv", index=False)
    write_manifest(raw, params.paths.manifest, params.manifest)
    params.paths.splits.mkdir(parents=True, exist_ok=True)
    for split, relative in (("train", "Training/glioma/Ad-gl_train.jpg"), ("val", "Training/notumor/Ad-no_val.jpg")):
        pd.DataFrame({"path": [(raw / relative).as_posix()], "label": [relative.split("/")[1]]}).to_csv(
            params.paths.splits / f"{split}.csv", index=False)

    source = raw.parent.parent / "feltrin-like"
    rows = [  # file, label, weighting, group, image, P(notumor) of the stack
        ("Glioma T2/a.jpg", "glioma", "T2", "1", appended["Training/glioma/Ad-gl_train.jpg"], 0.1),
        ("Glioma T2/b.jpg", "glioma", "T2", "1", drawn_scan(601), 0.1),
        ("Normal T1/c.jpg", "notumor", "T1", "2", appended["Training/notumor/Ad-no_val.jpg"], 0.8),
        ("Meningioma T1/d.jpg", "meningioma", "T1", "3", drawn_scan(602), 0.3),
        ("Schwannoma T2/e.jpg", "other_tumor", "T2", "4", drawn_scan(603), 0.2),
        ("Normal T2/f.jpg", "notumor", "T2", "5", drawn_scan(604), 0.7),
        ("Glioma T1/g.jpg", "glioma", "T1", "6", images["Testing/glioma/Te-gl_0.jpg"], 0.1),
        ("Meningioma T1C+/h.jpg", "meningioma", "T1C+", "7", drawn_scan(605), 0.2),
    ]
    table = {}
    for file, label, _, _, image, p_notumor in rows:
        key = save(image, source / file)
        table[key] = dict.fromkeys(MODELS, probabilities(p_notumor, "meningioma" if label == "meningioma" else
                                                         "glioma"))
    pd.DataFrame([{"file": f, "label": lab, "weighting": w, "group": g} for f, lab, w, g, *_ in rows]).to_csv(
        source / "labels.csv", index=False)

    result = run_external(params, source, scorer=StubScorer(table))

    report = json.loads((params.external.out_dir / "feltrin-like.json").read_text())
    assert report["layout"] == "labels"
    dropped = {d["file"]: d["reason"] for d in report["dropped"]}
    assert dropped == {"Glioma T2/a.jpg": "exact duplicate of a trained-on image (train split)",
                       "Glioma T2/b.jpg": "its group 1 trained",
                       "Glioma T1/g.jpg": "exact duplicate of a kaggle image"}
    held = {s["file"]: s["held_out_as"] for s in report["scans"]}
    assert held == {"Normal T1/c.jpg": "val", "Meningioma T1/d.jpg": None, "Schwannoma T2/e.jpg": None,
                    "Normal T2/f.jpg": None, "Meningioma T1C+/h.jpg": None}
    assert report["counts"]["scored_by_weighting"] == {"T1": 2, "T1C+": 1, "T2": 2}
    assert report["counts"]["scored_other_tumor"] == 1
    t1, t2 = report["by_weighting"]["T1"]["stack"], report["by_weighting"]["T2"]["stack"]
    assert_proportion(t1["tumor_sensitivity"], 1, 1)  # d: 1 - 0.3 >= 0.5
    assert_proportion(t1["tumor_specificity"], 1, 1)  # c: 1 - 0.8 < 0.5
    assert_proportion(t2["tumor_sensitivity"], 1, 1)  # e, an other_tumor, counts as a tumor
    assert_proportion(t2["tumor_specificity"], 1, 1)  # f
    assert_proportion(t2["accuracy"], 1, 1), "other_tumor is left out of class accuracy: only f counts"
    assert_proportion(report["metrics"]["stack"]["accuracy"], 4, 4)
    # MLflow takes no `+` in a metric's name: the T1C+ cell is logged as T1Cplus
    assert mlflow.get_run(result["run_id"]).data.metrics["T1Cplus.stack.tumor_sensitivity"] == 1.0
    markdown = (params.external.out_dir / "feltrin-like.md").read_text()
    assert "## T1 scans (2)" in markdown and "## T2 scans (2)" in markdown and "its group 1 trained" in markdown


def test_scoring_goes_through_one_client_path(kaggle, monkeypatch):
    """evaluate-external, `braintumor predict` (predict_paths) and the drift monitor send files to the model through
    components.predict.score_files alone."""
    import components.predict as predict

    params, _ = kaggle
    calls = []
    real = predict.score_files
    monkeypatch.setattr(predict, "score_files", lambda scorer, paths: calls.append(len(paths)) or real(scorer, paths))
    source = params.paths.raw.parent.parent / "one-path"
    key = save(drawn_scan(777), source / "yes" / "a.jpg")
    stub = StubScorer({key: dict.fromkeys(MODELS, probabilities(0.2))})
    import components.external as external

    monkeypatch.setattr(external, "score_files", predict.score_files)  # what `from ... import` bound at import
    run_external(params, source, scorer=stub)

    class Loaded:
        def unwrap_python_model(self):
            return stub

    monkeypatch.setattr(predict, "load_pyfunc", lambda uri: Loaded())
    frame = predict.predict_paths([str(source / "yes" / "a.jpg")], "models:/x/1")
    assert calls == [1, 1] and frame.predicted_class.tolist() == ["glioma"]
    assert frame.prob_notumor.tolist() == pytest.approx([0.2])
