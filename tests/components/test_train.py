import json
import os
import signal
import subprocess
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from components import tracking
from components.train import Outputs, _prepare_checkpoints, train_model
from tests.conftest import tiny_overrides, tiny_params


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_training_writes_every_output_and_one_complete_mlflow_run(workspace, cache):
    params = tiny_params(workspace, ["models.custom_cnn.epochs=2", f"train.cache={cache}"])
    result = train_model("custom_cnn", params)
    outputs = Outputs.of(params, "custom_cnn")

    assert outputs.model.exists() and result.epochs_run == 2 and result.resumed_from_epoch == 0
    for split in ("val", "stack", "test"):
        frame = pd.read_parquet(outputs.predictions / f"{split}.parquet")
        probabilities = frame[[f"prob_{c}" for c in params.data.classes]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert len(frame) == len(pd.read_csv(params.paths.splits / f"{split}.csv"))
    metrics = json.loads(outputs.metrics.read_text())
    assert set(metrics) == {"val", "stack", "test", "test_clean"}
    assert {"accuracy", "macro_f1", "recall_glioma"} <= set(metrics["test"])
    assert list(pd.read_csv(outputs.plots / "history.csv").epoch) == [0, 1]
    assert not outputs.checkpoints.exists(), "a finished run leaves nothing to resume"

    tracking.configure(params.tracking)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["models.custom_cnn.epochs"] == "2" and run.data.params["seed"] == str(params.seed)
    assert {"git_commit", "dvc_data_hash", "params_hash", "tensorflow_version", "keras_version", "device",
            "gpu_name"} <= set(run.data.tags)
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "plots")}
    assert {"plots/history.png", "plots/confusion_matrix.png"} <= artifacts
    logged = mlflow.last_logged_model() or mlflow.search_logged_models(output_format="list")[0]
    loaded = mlflow.keras.load_model(f"models:/{logged.model_id}")
    assert loaded.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 4)
    assert mlflow.models.Model.load(f"models:/{logged.model_id}").signature is not None


def test_a_killed_training_resumes_from_its_saved_epoch(workspace):
    overrides = tiny_overrides(["models.custom_cnn.epochs=12", "train.early_stopping_patience=100"])
    command = ["braintumor", *[arg for o in overrides for arg in ("-S", o)], "train", "--model", "custom_cnn"]
    metadata = workspace / ".checkpoints" / "custom_cnn" / "full" / "training_metadata.json"
    process = subprocess.Popen(command, cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be interrupted"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = json.loads(metadata.read_text())["epoch"]

    params = tiny_params(workspace, ["models.custom_cnn.epochs=12", "train.early_stopping_patience=100"])
    result = train_model("custom_cnn", params)

    assert result.resumed_from_epoch == saved >= 3
    epochs = list(pd.read_csv(workspace / "plots" / "custom_cnn" / "history.csv").epoch)
    assert epochs[-1] == 11 and epochs[epochs.index(saved - 1) + 1] == saved, "resumed run continues the epoch count"
    resumed_run = mlflow.get_run(result.run_id)
    assert resumed_run.data.tags["resumed_from_epoch"] == str(saved)
    assert min(m.step for m in mlflow.MlflowClient().get_metric_history(result.run_id, "loss")) == saved


def test_the_same_seed_with_determinism_on_trains_the_same_model_in_two_processes(workspace):
    """`train.deterministic: true`: two `braintumor train` processes of one seed (each a fresh TensorFlow, as two
    `dvc repro` runs are) give bit-identical val predictions, augmentation and shuffling included."""
    overrides = tiny_overrides(["models.custom_cnn.epochs=2", "train.deterministic=true"])
    command = ["braintumor", *[arg for o in overrides for arg in ("-S", o)], "train", "--model", "custom_cnn"]
    params = tiny_params(workspace, ["train.deterministic=true"])
    columns = [f"prob_{c}" for c in params.data.classes]
    runs = []
    for _ in range(2):
        done = subprocess.run(command, cwd=workspace, capture_output=True, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(pd.read_parquet(Outputs.of(params, "custom_cnn").predictions / "val.parquet")[columns].to_numpy())
    assert runs[0].std() > 0, "the model learned something to compare"
    np.testing.assert_array_equal(runs[0], runs[1])


def test_changed_params_discard_resume_state(workspace):
    params = tiny_params(workspace)
    outputs = Outputs.of(params, "custom_cnn")
    _prepare_checkpoints(outputs, params.model("custom_cnn"))
    (outputs.checkpoints / "full").mkdir()
    _prepare_checkpoints(outputs, params.model("custom_cnn"))
    assert (outputs.checkpoints / "full").exists()
    _prepare_checkpoints(outputs, params.model("custom_cnn").model_copy(update={"epochs": 7}))
    assert not (outputs.checkpoints / "full").exists()


def test_evaluation_batches_keep_the_frame_order(workspace):
    from components.dataset import label_indices, make_dataset, read_split
    from components.images import load_rgb

    params = tiny_params(workspace)
    frame = pd.concat([read_split(params.paths.splits, s) for s in ("train", "val", "test")]).reset_index(drop=True)
    dataset = make_dataset(frame, params.data, params.model("custom_cnn"), params.train, training=False,
                           seed=params.seed, batch_size=5)
    images = np.concatenate([x.numpy() for x, _ in dataset])
    labels = np.concatenate([y.numpy() for _, y in dataset])
    np.testing.assert_array_equal(labels, label_indices(frame, params.data.classes))
    # Labels come in long runs of one class, so the images themselves must match their paths, row by row.
    expected = np.stack([load_rgb(p, params.model("custom_cnn").image_size, params.data.preprocess)
                         for p in frame.path]).astype(np.float32)
    np.testing.assert_array_equal(images, expected)


def test_style_balance_weighs_a_class_s_rare_weighting_like_its_common_one_up_to_the_cap(params):
    from components.config import ProjectError
    from components.style import T1, T2
    from components.train import loss_weights

    # glioma: 10 T1-like, 2 T2-like (ratio 5, capped at 3); notumor: 4 T1-like, 4 T2-like (already balanced).
    labels = ["glioma"] * 12 + ["notumor"] * 8
    weighting = [T1] * 10 + [T2] * 2 + [T1] * 4 + [T2] * 4
    frame = pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(20)], "label": labels})
    styles = pd.DataFrame({"path": frame.path, "weighting": weighting})
    train = params.train.model_copy(update={"style_balance": True, "style_balance_max_weight": 3.0,
                                            "class_weights": False})
    weights = loss_weights(frame, train, styles)
    glioma, notumor = weights[:12], weights[12:]
    assert weights.mean() == pytest.approx(1.0)
    assert glioma[10] / glioma[0] == pytest.approx(3.0), "capped at style_balance_max_weight"
    assert np.ptp(notumor) == pytest.approx(0.0)
    assert glioma.sum() / notumor.sum() == pytest.approx(12 / 8), "each class keeps its share of the loss"

    both = loss_weights(frame, train.model_copy(update={"class_weights": True}), styles)
    assert both[:12].sum() == pytest.approx(both[12:].sum()), "class weights then make the classes weigh the same"
    assert loss_weights(frame, train.model_copy(update={"style_balance": False}), None) is None

    with pytest.raises(ProjectError, match="dvc repro style"):
        loss_weights(frame, train, styles.iloc[:5])
