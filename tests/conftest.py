"""Shared fixtures: tiny images made on the fly, a fixed sample of the shared data, and a params object."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "brain-tumor-mri"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
# Known cross-split byte-identical pair (from the data set README), always part of the sample.
KNOWN_TWIN = ("Testing/meningioma/Te-meTr_0001.jpg", "Training/meningioma/Tr-me_0196.jpg")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tree_digest(folder: Path) -> str:
    """Hash of every file's path and bytes, to prove a folder was left unchanged."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return digest.hexdigest()


def class_image(label_index: int, rng: np.random.Generator, size: int = 32, mode: str = "L") -> Image.Image:
    """A learnable toy scan: a bright blob whose position depends on the class, plus noise."""
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)][label_index]
    blob = np.exp(-(((y / size - cy) ** 2 + (x / size - cx) ** 2) / 0.02))
    array = np.clip(blob * 200 + rng.normal(30, 15, (size, size)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, mode="L")
    return image.convert(mode) if mode != "L" else image


def write_tiny_dataset(root: Path, per_class: dict[str, int] | None = None, size: int = 32, seed: int = 0) -> Path:
    """Kaggle layout with generated images: Training/<class>/Tr-*.jpg, Testing/<class>/Te-*.jpg."""
    per_class = per_class or {"Training": 10, "Testing": 4}
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        prefix = "Tr" if split == "Training" else "Te"
        for index, label in enumerate(CLASSES):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                mode = "RGB" if n % 2 else "L"
                class_image(index, rng, size, mode).save(folder / f"{prefix}-{label[:2]}_{n:04d}.jpg", quality=95)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def real_sample(tmp_path_factory) -> Path:
    """A fixed, deterministic sample of the shared data: the first files of every class folder, plus a known
    cross-split twin pair and the exact twins of the sampled test files."""
    if not SHARED.is_dir():
        pytest.fail(f"shared data set not found at {SHARED}: tests expect ../shared beside the repo")
    root = tmp_path_factory.mktemp("real") / "sample"
    chosen = set(KNOWN_TWIN)
    for split, count in (("Training", 12), ("Testing", 6)):
        for label in CLASSES:
            chosen |= {str(p.relative_to(SHARED)) for p in sorted((SHARED / split / label).glob("*.jpg"))[:count]}
    # Bring in the byte-identical training copies of the sampled test images, so leakage is really exercised.
    test_hashes = {hashlib.sha256((SHARED / p).read_bytes()).hexdigest() for p in chosen if p.startswith("Testing")}
    for label in CLASSES:
        for path in sorted((SHARED / "Training" / label).glob("*.jpg")):
            if hashlib.sha256(path.read_bytes()).hexdigest() in test_hashes:
                chosen.add(str(path.relative_to(SHARED)))
    for relative in sorted(chosen):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SHARED / relative, root / relative)
    return root


@pytest.fixture
def params() -> Params:
    """Repo params, shrunk for 2 CPU cores and tiny images."""
    return load_params(ROOT / "params.yaml", [
        "validate.min_side=16", "validate.min_class_share=0.05", "validate.max_class_share=0.6",
        "split.val_fraction=0.25", "split.stack_fraction=0.25",
    ])


def git_dvc_repo(folder: Path, files: dict[str, str] | None = None) -> Path:
    """A new git + DVC repo in `folder` (made if missing) holding `files` (path in the repo -> text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=folder, check=True)
    return folder


@contextmanager
def environment(**changes: str | None):
    """os.environ with `changes` applied (None removes a variable) inside the block, as it was after it."""
    saved = {key: os.environ.get(key) for key in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield os.environ
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_repo(work: Path) -> Path:
    """A git + DVC repo holding this project's dvc.yaml, params.yaml, components (the stages' code deps) and the
    audit's hand labels."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, work / name)
    shutil.copytree(ROOT / "components", work / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs" / "audit", work / "docs" / "audit")  # the audit stage's hand labels
    git_dvc_repo(work)
    subprocess.run(["dvc", "config", "core.autostage", "true"], cwd=work, check=True)
    return work


def keep_models(repo: Path, models: list[str]) -> list[str]:
    """Cut the repo's dvc.yaml to the trainings of `models`: the train matrix, and every stage's deps on the other
    models' files; returns the override that makes the ensemble those models. For tests that need the whole chain
    but not every architecture: DenseNet169 and ResNet50 weigh ~60-100 MB each at any image size, in every copy
    and upload."""
    import yaml

    document = yaml.safe_load((repo / "dvc.yaml").read_text())
    dropped = set(document["stages"]["train"]["matrix"]["model"]) - set(models)
    document["stages"]["train"]["matrix"]["model"] = models
    for stage in document["stages"].values():
        stage["deps"] = [dep for dep in stage.get("deps", [])
                         if not (isinstance(dep, str) and dropped & set(dep.split("/")))]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return [f"stack.models=[{','.join(models)}]"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A throwaway git + DVC repo holding this project's dvc.yaml and params.yaml; cwd is set to it."""
    work = init_repo(tmp_path / "project")
    monkeypatch.chdir(work)
    return work


TINY_TRAINING = [
    "models.{m}.image_size=32", "models.{m}.batch_size=8", "models.{m}.epochs=1", "models.{m}.head_epochs=0",
    "models.{m}.augmentation.rotation=0.0", "models.{m}.augmentation.zoom=0.0",
]


def tiny_overrides(extra: list[str] | None = None) -> list[str]:
    """`section.key=value` overrides for 32 px images, one epoch, small batches, on every model."""
    overrides = [o.format(m=m) for m in CLASSES_MODELS for o in TINY_TRAINING]
    return overrides + ["validate.min_side=16", "validate.min_class_share=0.05", "validate.max_class_share=0.6",
                  "split.val_fraction=0.25", "split.stack_fraction=0.25", "train.eval_batch_size=16", "train.run_eagerly=true", "models.custom_cnn.filters=[8,16]"] + (extra or [])


def tiny_params(root: Path, extra: list[str] | None = None) -> Params:
    return load_params(root / "params.yaml", tiny_overrides(extra))


CLASSES_MODELS = ["custom_cnn", "mobilenetv2", "densenet169", "resnet50"]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """cwd = a temp folder holding params.yaml, tiny data in data/raw and its splits; MLflow store inside it."""
    from components.manifest import write_manifest
    from components.split import write_splits

    # A name never used before in this process: pytest deletes a passed test's tmp_path and may hand the same path
    # to the next test, while MLflow keeps its connection to the deleted store (sqlite: "readonly database").
    root = tmp_path / f"workspace-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy2(ROOT / "params.yaml", root / "params.yaml")
    params = tiny_params(root)
    write_tiny_dataset(root / params.paths.raw, {"Training": 12, "Testing": 4})
    write_manifest(params.paths.raw, params.paths.manifest, params.manifest)
    params.paths.quarantine.write_text("path,label,reason\n")
    write_splits(params.paths, params.split, params.seed)
    return root


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory, prefect_harness):
    """Tiny data run end to end by `braintumor flow train`'s code path on a local Ray (flow.runner: ray), in a
    git + DVC repo: four trained models, the stack, the evaluation and a registry. Built once per session.

    Right after the run it records `dvc status`, then runs the flow a second time with nothing changed (local
    runner), before any test can touch the outputs: see tests/flows/test_training_flow_end_to_end.py.
    Tests use the workspace through `in_trained` (cwd set to it)."""
    import time

    from components.config import write_overrides
    from components.data_import import import_dataset
    from flows.training import run_with_runner

    root = init_repo(tmp_path_factory.mktemp("trained") / "repo")
    previous = Path.cwd()
    os.chdir(root)
    try:
        with environment(MLFLOW_TRACKING_URI=None, RAY_ADDRESS=None):
            write_overrides(root / "params.yaml", tiny_overrides(TRAINED_EXTRA + ["flow.runner=ray"]))
            import_dataset(str(write_tiny_dataset(root.parent / "tiny", {"Training": 12, "Testing": 4})),
                           root / "data" / "raw")
            record = {}
            for run, overrides in (("first", None), ("second", ["flow.runner=local"])):
                start = time.perf_counter()
                record[run] = run_with_runner(str(root / "params.yaml"), overrides)
                record[run]["seconds"] = time.perf_counter() - start
                if run == "first":
                    status = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True, check=True)
                    record["dvc_status_after_first"] = json.loads(status.stdout or "{}")
            (root / "flow_runs.json").write_text(json.dumps(record, indent=2, default=str))
            shutil.copy2(root / "params.yaml", root / "params_trained.yaml")  # for code that takes a params path
            # As the flow left it, before any test registers, promotes or reports in the workspace: `trained_copy`.
            shutil.copytree(root, root.parent / "pristine", symlinks=True)
    finally:
        os.chdir(previous)
    return root


# monitor.calibration_sizes: the tests' batches hold 3 to 24 scans, and the tiny pool of held-out scans 17; sizes of
# 60 to 200 would only cost the reference stage time (batches past the largest size take its thresholds).
TRAINED_EXTRA = ["stack.time_budget=3", "evaluate.gradcam_examples=1", "promote.min_accuracy=0.0",
                 "promote.min_class_sensitivity=0.0", "monitor.calibration_sizes=[20,40]"]


IMMUTABLE = (f"{os.sep}.dvc{os.sep}cache{os.sep}", f"{os.sep}mlflow{os.sep}artifacts{os.sep}")


def link_if_immutable(source: str, target: str) -> str:
    """Hard-link files no tool rewrites in place (DVC's content-addressed cache, logged MLflow artifacts), copy the
    rest: a copy of the trained workspace then takes a fraction of its ~2.4 GB of disk and time."""
    if any(part in source for part in IMMUTABLE):
        os.link(source, target)
        return target
    return shutil.copy2(source, target)


@pytest.fixture
def trained_copy(trained_workspace, tmp_path) -> Path:
    """A private copy of the trained workspace as the flow left it, with everything committed to git: a repo that
    can be cloned. Its MLflow store is a copy too; artifacts stay where the trained workspace logged them."""
    copy = tmp_path / "trained-copy"
    shutil.copytree(trained_workspace.parent / "pristine", copy, symlinks=True, copy_function=link_if_immutable)
    for command in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "trained tiny pipeline"]):
        subprocess.run(command, cwd=copy, check=True, capture_output=True)
    return copy


@pytest.fixture
def in_trained(trained_workspace, monkeypatch) -> Path:
    monkeypatch.chdir(trained_workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return trained_workspace


# Tests that train models, start servers or read the shared data: `pytest -m "not slow"` leaves them out.
TRAINED_FIXTURES = {"trained_workspace", "trained_copy", "in_trained"}
SLOW_FIXTURES = TRAINED_FIXTURES | {"workspace", "real_sample"}
# The README's command runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): each xdist group stays
# on one worker, and a test module without a group is one unit. This group holds every test of the trained workspace,
# so that it is built once, and every test that starts Ray (their modules mark themselves): the one-machine cluster's
# teardown runs `ray stop --force`, which stops every Ray on the machine, so they run one after another.
TRAINED_AND_RAY = pytest.mark.xdist_group("trained-workspace-and-ray")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if TRAINED_FIXTURES & fixtures:
            item.add_marker(TRAINED_AND_RAY)


def pytest_collection_finish(session):
    """Under `--dist loadgroup` xdist carries an item's group in its node id (`...@group`); when a pytest release
    breaks that (pytest-xdist #1386), the groups scatter silently and each worker builds the trained workspace."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist dropped the xdist_group of {len(lost)} tests (first: {lost[0]}): "
                                "use the pytest that pyproject.toml's dev extra pins (`uv sync --extra dev`)")


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
