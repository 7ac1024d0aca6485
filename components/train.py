"""Train one CNN (`braintumor train --model NAME`): one process, one model, one MLflow run.

Writes models/NAME/model.keras, predictions/NAME/{val,stack,test}.parquet, metrics/NAME.json and plots/NAME/.
A killed training resumes from its last finished epoch (Keras BackupAndRestore) when run again with the same
params; changed params start over.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import ModelParams, Params, ProjectError, TrainParams, is_pretrained
from components.metrics import plot_confusion, plot_history, probability_columns, scores, split_metrics

log = logging.getLogger(__name__)

# Splits every training predicts: val (what it was selected on), stack (the meta-learner's rows) and test.
PREDICTED_SPLITS = ("val", "stack", "test")


@dataclass
class TrainResult:
    name: str
    metrics: dict[str, dict[str, float]]
    model_path: Path
    run_id: str
    epochs_run: int
    resumed_from_epoch: int


@dataclass(frozen=True)
class Outputs:
    model: Path
    predictions: Path
    metrics: Path
    plots: Path
    checkpoints: Path

    @classmethod
    def of(cls, params: Params, name: str) -> Outputs:
        paths = params.paths
        return cls(paths.models / name / "model.keras", paths.predictions / name, paths.metrics / f"{name}.json",
                   paths.plots / name, paths.checkpoints / name)


def _prepare_checkpoints(outputs: Outputs, model_params: ModelParams) -> None:
    """Keep resume state only if it was made with the same model params; a fresh start also resets history."""
    stamp = outputs.checkpoints / "params.json"
    current = model_params.model_dump_json()
    if stamp.exists() and stamp.read_text() != current:
        log.info("params of %s changed since the interrupted run: starting over", outputs.checkpoints.name)
        shutil.rmtree(outputs.checkpoints)
    if not stamp.exists():
        (outputs.plots / "history.csv").unlink(missing_ok=True)
        outputs.checkpoints.mkdir(parents=True, exist_ok=True)
        stamp.write_text(current)


def _saved_epoch(backup_dir: Path) -> int:
    metadata = backup_dir / "training_metadata.json"
    return json.loads(metadata.read_text())["epoch"] if metadata.exists() else 0


def epoch_progress(total_epochs: int, monitor: str):
    """A Keras callback logging one console line per epoch: its time, loss, the monitored metric with its best so
    far, and the time left if every epoch runs (early stopping may end sooner)."""
    import time

    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.best = time.perf_counter(), None
            self.first = None

        def on_epoch_begin(self, epoch, logs=None):
            self.first = epoch if self.first is None else self.first

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            elapsed = time.perf_counter() - self.started
            per_epoch = elapsed / (epoch + 1 - self.first)
            value = logs.get(monitor)
            if value is not None:
                better = min if "loss" in monitor else max
                self.best = value if self.best is None else better(self.best, value)
            shown = f"{monitor} {value:.4f} (best {self.best:.4f})" if value is not None else ""
            log.info("epoch %d/%d: %.0f s, loss %.4f, %s; at most %.1f min left", epoch + 1, total_epochs,
                     per_epoch, logs.get("loss", float("nan")), shown, per_epoch * (total_epochs - epoch - 1) / 60)

    return EpochProgress()


def _callbacks(params: Params, model_params: ModelParams, outputs: Outputs, phase: str, learning_rate: float):
    import keras
    import mlflow

    train = params.train
    mode = "min" if "loss" in train.monitor else "max"
    callbacks = [
        epoch_progress(model_params.epochs, train.monitor),
        keras.callbacks.BackupAndRestore(str(outputs.checkpoints / phase)),
        keras.callbacks.EarlyStopping(monitor=train.monitor, mode=mode, patience=train.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.CSVLogger(str(outputs.plots / "history.csv"), append=True),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: mlflow.log_metrics(
            {k: float(v) for k, v in (logs or {}).items()}, step=epoch)),
    ]
    if train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=train.monitor, mode=mode,
                                                           factor=train.plateau_factor,
                                                           patience=train.plateau_patience,
                                                           min_lr=train.min_learning_rate))
    return callbacks


def _optimizer(params: Params, learning_rate: float, steps: int, steps_per_epoch: int):
    """Adam or AdamW at `learning_rate`; with the cosine schedule, a linear warmup from a tenth of it over
    train.warmup_epochs, then cosine decay to train.min_learning_rate over the rest of the phase's `steps`. With
    train.use_ema the EMA weights overwrite the model's once per epoch, so validation, early stopping and the
    saved model all see the averaged weights."""
    import keras

    train = params.train
    schedule = learning_rate
    if train.lr_schedule == "cosine":
        warmup = min(train.warmup_epochs * steps_per_epoch, max(steps - 1, 0))
        schedule = keras.optimizers.schedules.CosineDecay(
            learning_rate / 10 if warmup else learning_rate, decay_steps=max(steps - warmup, 1),
            alpha=train.min_learning_rate / learning_rate, warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup)
    ema = {"use_ema": train.use_ema, "ema_momentum": train.ema_momentum,
           "ema_overwrite_frequency": steps_per_epoch if train.use_ema else None}
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=train.weight_decay, **ema)
    return keras.optimizers.Adam(schedule, **ema)


def _phases(name: str, model_params: ModelParams) -> list[tuple[str, int, int, float]]:
    """(phase, first epoch, last epoch, learning rate). From scratch there is nothing to freeze: one phase in
    which every layer trains."""
    if not is_pretrained(name, model_params.weights):
        return [("full", 0, model_params.epochs, model_params.learning_rate)]
    if model_params.head_epochs == 0:
        return [("fine_tune", 0, model_params.epochs, model_params.fine_tune_learning_rate)]
    head = min(model_params.head_epochs, model_params.epochs)
    phases = [("head", 0, head, model_params.learning_rate)]
    if model_params.epochs > head:
        phases.append(("fine_tune", head, model_params.epochs, model_params.fine_tune_learning_rate))
    return phases


def loss_weights(train_frame: pd.DataFrame, train: TrainParams, styles: pd.DataFrame | None) -> np.ndarray | None:
    """Per-scan loss weights, mean 1, or None when neither option asks for any.

    train.style_balance: within each class, every MRI weighting (styles: paths.style) gets the weight of the class's
    most common one, so a T2-like meningioma counts as much as a T1-like one; a rare weighting's scans weigh at most
    train.style_balance_max_weight times a common one's. Each class keeps its total weight. train.class_weights: then
    each class weighs the same (scikit-learn's "balanced" class weights)."""
    from sklearn.utils.class_weight import compute_class_weight

    if not (train.style_balance or train.class_weights):
        return None
    weights = np.ones(len(train_frame))
    labels = train_frame.label.to_numpy()
    if train.style_balance:
        weighting = train_frame[["path"]].merge(styles[["path", "weighting"]], on="path", how="left").weighting
        if weighting.isna().any():
            missing = train_frame.path[weighting.isna().to_numpy()]
            raise ProjectError(f"{len(missing)} training scans have no weighting in the style table (first: "
                               f"{missing.iloc[0]}): it predates the split; run `dvc repro style`")
        weighting = weighting.to_numpy()
        for label in np.unique(labels):
            in_class = labels == label
            cells, counts = np.unique(weighting[in_class], return_counts=True)
            for cell, count in zip(cells, counts):
                weights[in_class & (weighting == cell)] = min(counts.max() / count, train.style_balance_max_weight)
            weights[in_class] *= in_class.sum() / weights[in_class].sum()
    if train.class_weights:
        present = np.unique(labels)
        balanced = dict(zip(present, compute_class_weight("balanced", classes=present, y=labels)))
        weights *= np.array([balanced[label] for label in labels])
    return weights / weights.mean()


def predict_frame(model, frame: pd.DataFrame, params: Params, model_params: ModelParams,
                  cache_dir: Path) -> pd.DataFrame:
    from components.dataset import make_dataset

    dataset = make_dataset(frame, params.data, model_params, params.train, training=False,
                           seed=params.seed, cache_dir=cache_dir)
    probabilities = model.predict(dataset, verbose=0)
    keep = [c for c in ("path", "label", "clean") if c in frame]
    return pd.concat([frame[keep].reset_index(drop=True),
                      pd.DataFrame(probabilities, columns=probability_columns(params.data.classes))], axis=1)


def train_model(name: str, params: Params) -> TrainResult:
    import keras
    import mlflow
    import tensorflow as tf

    from components import tracking
    from components.dataset import make_dataset, read_split
    from components.devices import configure_tensorflow
    from components.models import build_model, set_trainable
    from components.style import read_styles

    model_params = params.model(name)
    classes = params.data.classes
    outputs = Outputs.of(params, name)
    for folder in (outputs.model.parent, outputs.predictions, outputs.plots):
        folder.mkdir(parents=True, exist_ok=True)
    _prepare_checkpoints(outputs, model_params)
    device = configure_tensorflow(params.train, params.seed, model_params.cpu_bfloat16)

    frames = {split: read_split(params.paths.splits, split) for split in ("train", *PREDICTED_SPLITS)}
    cache_dir = outputs.checkpoints / "cache"
    weights = loss_weights(frames["train"], params.train, read_styles(params) if params.train.style_balance else None)
    # One-hot targets: label smoothing needs them (Keras's sparse cross-entropy has none).
    one_hot = lambda images, labels, *weight: (images, tf.one_hot(labels, len(classes)), *weight)  # noqa: E731
    train_data = make_dataset(frames["train"], params.data, model_params, params.train, training=True,
                              seed=params.seed, cache_dir=cache_dir, weights=weights).map(one_hot)
    val_data = make_dataset(frames["val"], params.data, model_params, params.train, training=False, seed=params.seed,
                            cache_dir=cache_dir).map(one_hot)

    model = build_model(name, model_params, params.train, len(classes))
    resumed_from = max(_saved_epoch(outputs.checkpoints / phase) for phase, *_ in _phases(name, model_params))
    head_done = outputs.checkpoints / "head.weights.h5"
    steps_per_epoch = math.ceil(len(frames["train"]) / model_params.batch_size)
    log.info("%d training and %d val images at %d px, up to %d epochs on %s%s (the first epoch also decodes "
             "and caches the images)", len(frames["train"]), len(frames["val"]), model_params.image_size,
             model_params.epochs, "a GPU" if device["gpus"] else "the CPU",
             f", resuming after epoch {resumed_from}" if resumed_from else "")

    with tracking.stage_run(params, run_name=f"train-{name}", stage="train") as run:
        mlflow.log_params({"model": name, **tracking.flatten(f"models.{name}", model_params.model_dump()),
                           **tracking.flatten("train", params.train.model_dump()), "seed": params.seed,
                           "train_images": len(frames["train"]), "val_images": len(frames["val"])})
        mlflow.set_tags({**tracking.system_info(), **{k: str(v) for k, v in device.items()},
                         "resumed_from_epoch": str(resumed_from)})
        for phase, first, last, learning_rate in _phases(name, model_params):
            if phase == "head" and head_done.exists():
                model.load_weights(head_done)
                continue
            set_trainable(model, phase, model_params.unfreeze_layers)
            model.compile(optimizer=_optimizer(params, learning_rate, steps_per_epoch * (last - first),
                                               steps_per_epoch),
                          loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.train.label_smoothing),
                          metrics=["accuracy"],
                          jit_compile=bool(device["jit_compile"]), run_eagerly=params.train.run_eagerly)
            model.fit(train_data, validation_data=val_data, initial_epoch=first, epochs=last,
                      verbose=2,
                      callbacks=_callbacks(params, model_params, outputs, phase, learning_rate))
            if phase == "head":
                model.save_weights(head_done)

        model.save(outputs.model)
        predictions = {split: predict_frame(model, frames[split], params, model_params, cache_dir)
                       for split in PREDICTED_SPLITS}
        for split, frame in predictions.items():
            frame.to_parquet(outputs.predictions / f"{split}.parquet", index=False)
        metrics = split_metrics(predictions, classes)
        outputs.metrics.parent.mkdir(parents=True, exist_ok=True)
        outputs.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        mlflow.log_metrics({f"{split}.{key}": value for split, values in metrics.items()
                            for key, value in values.items()})

        history = pd.read_csv(outputs.plots / "history.csv")
        mlflow.log_artifact(str(plot_history(history, name, outputs.plots / "history.png")), "plots")
        mlflow.log_artifact(str(plot_confusion(*scores(predictions["test"], classes), classes,
                                               f"{name} (official test)",
                                               outputs.plots / "confusion_matrix.png")), "plots")
        mlflow.log_artifact(str(outputs.metrics))
        example = np.zeros((1, model_params.image_size, model_params.image_size, 3), dtype=np.float32)
        logged = tracking.log_keras_model(model, example)
        run_id = run.info.run_id
        # Lets the register stage find this exact model in MLflow, in the store named here.
        (outputs.model.parent / "mlflow.json").write_text(json.dumps(
            {"tracking_uri": tracking.public_uri(mlflow.get_tracking_uri()), "run_id": run_id,
             "model_uri": logged.model_uri, "model_id": logged.model_id}, indent=2) + "\n")

    best = history[params.train.monitor].max() if "loss" not in params.train.monitor else \
        history[params.train.monitor].min()
    log.info("done: %d epochs, best %s %.4f; val accuracy %.4f (%s)", len(history), params.train.monitor, best,
             metrics["val"]["accuracy"], outputs.model)
    shutil.rmtree(outputs.checkpoints, ignore_errors=True)  # finished: nothing left to resume
    keras.backend.clear_session()
    return TrainResult(name, metrics, outputs.model, run_id, len(history), resumed_from)
