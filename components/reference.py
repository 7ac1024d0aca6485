"""What "in distribution" looks like, recorded at training time (`braintumor reference`, DVC stage `reference`).

The profile is a folder (params paths.reference) that the monitor (components.monitor) compares every incoming
batch with, and that `register` logs with the ensemble (artifact `reference`), so a registered version carries the
profile of the data it was trained on:

- embeddings.parquet: the embedding of every training image: the pooled features (the layer named "pool", which
  every model of components.models has) of the base model params monitor.embedding_model;
- style.parquet: the acquisition-style features of every training image (from the `style` stage's paths.style);
- val_distances.parquet: each val image's distance to the training data (below);
- reference.json: the embedding model and the decoding it was fed (image size, params data.preprocess), the
  predicted class mix of the stack on val (predictions/stack/val.parquet), the out-of-distribution threshold, and
  the drift thresholds per batch size calibrated on batches drawn from the held-out splits in
  monitor.calibration_splits (components.drift), with the false-alarm rate they reach.

A scan's distance to the training data is the mean Euclidean distance of its embedding to its monitor.ood_neighbours
nearest training embeddings (scikit-learn NearestNeighbors). Val images are not trained on, so their distances are
those of new scans drawn like the training data; the threshold is their monitor.ood_percentile percentile. Images
are decoded exactly as training decodes them (components.images.load_rgb with params data.preprocess).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params, Preprocess, ProjectError
from components.images import load_rgb
from components.style import STYLE_FEATURES, read_styles

log = logging.getLogger(__name__)

POOL_LAYER = "pool"
EMBEDDINGS, STYLE, VAL_DISTANCES, META = "embeddings.parquet", "style.parquet", "val_distances.parquet", \
    "reference.json"
EMBEDDING_PREFIX = "e"


def embedding_extractor(model):
    """A Keras model from `model`'s inputs to its pooled features (the layer named "pool")."""
    import keras

    try:
        pool = model.get_layer(POOL_LAYER)
    except ValueError:
        raise ProjectError(f"model {model.name} has no layer named {POOL_LAYER!r} (every model of components.models "
                           "has one); pass a model built by this project as monitor.embedding_model") from None
    return keras.Model(model.inputs, pool.output)


def embed(extractor, paths: list[str], preprocess: Preprocess, batch_size: int) -> np.ndarray:
    """(len(paths), features) float32 embeddings; every image decoded by load_rgb at the extractor's input size."""
    size = int(extractor.input_shape[1])
    parts = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([load_rgb(path, size, preprocess) for path in paths[start:start + batch_size]])
        parts.append(np.asarray(extractor.predict_on_batch(batch.astype(np.float32)), dtype=np.float32))
    if not parts:
        return np.zeros((0, int(extractor.output_shape[-1])), dtype=np.float32)
    return np.concatenate(parts).reshape(len(paths), -1)


def neighbour_distance(training: np.ndarray, query: np.ndarray, neighbours: int) -> np.ndarray:
    """Per query row, the mean Euclidean distance to its `neighbours` nearest rows of `training`."""
    from sklearn.neighbors import NearestNeighbors

    if len(query) == 0:
        return np.zeros(0)
    index = NearestNeighbors(n_neighbors=min(neighbours, len(training))).fit(training)
    distances, _ = index.kneighbors(query)
    return distances.mean(axis=1)


def embedding_columns(width: int) -> list[str]:
    return [f"{EMBEDDING_PREFIX}{i:04d}" for i in range(width)]


@dataclass(frozen=True)
class Reference:
    folder: Path
    meta: dict
    embeddings: np.ndarray  # (training images, features)
    style: pd.DataFrame  # path + STYLE_FEATURES of the training images that decoded

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(**self.meta["preprocess"])

    @property
    def threshold(self) -> float:
        return float(self.meta["ood_threshold"])


def load_reference(folder: Path | str) -> Reference:
    folder = Path(folder)
    missing = [name for name in (META, EMBEDDINGS, STYLE) if not (folder / name).exists()]
    if missing:
        raise ProjectError(f"{folder} holds no reference profile (missing {', '.join(missing)}): run `dvc repro "
                           "reference` (or `dvc pull`), or pass a --model-uri of an ensemble registered with one")
    meta = json.loads((folder / META).read_text())
    frame = pd.read_parquet(folder / EMBEDDINGS)
    embeddings = frame[[c for c in frame.columns if c.startswith(EMBEDDING_PREFIX)]].to_numpy(dtype=np.float32)
    return Reference(folder, meta, embeddings, pd.read_parquet(folder / STYLE))


def predicted_counts(predictions: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    """How many rows each class wins (highest `prob_<class>`), every class listed."""
    from components.metrics import probability_columns

    winners = np.asarray(classes)[predictions[probability_columns(classes)].to_numpy().argmax(axis=1)]
    return {c: int((winners == c).sum()) for c in classes}


def calibrate_drift(params: Params, extractor, train_embeddings: np.ndarray, train_style: pd.DataFrame,
                    class_mix: dict[str, float], ood_threshold: float, val: pd.DataFrame, val_embeddings: np.ndarray,
                    val_distances: np.ndarray, val_predictions: pd.DataFrame) -> dict:
    """Drift thresholds per batch size (components.drift.calibrate): the class mix from val batches (the stack
    predicted val), the other checks from batches of every split in monitor.calibration_splits, pooled; each pool
    resampled by the splits' duplicate groups (a split holds whole groups), one split's worth of groups per set."""
    from components.drift import CHECKS, BatchPool, calibrate
    from components.metrics import probability_columns

    monitor, paths, classes = params.monitor, params.paths, params.data.classes
    styles = read_styles(params)[["path", *STYLE_FEATURES]]

    def pool(frame: pd.DataFrame, embeddings: np.ndarray, distances: np.ndarray, predicted, splits: int) -> BatchPool:
        style = frame[["path"]].merge(styles, on="path", how="left")
        return BatchPool(train_embeddings, train_style, STYLE_FEATURES, class_mix, ood_threshold, embeddings, style,
                         predicted, distances, groups=frame.group.to_numpy(),
                         set_groups=max(1, round(frame.group.nunique() / splits)))

    by_path = val_predictions.set_index("path")
    predicted = np.asarray(classes)[by_path.loc[val.path, probability_columns(classes)].to_numpy().argmax(axis=1)]
    val_pool = pool(val, val_embeddings, val_distances, predicted, 1)
    frames, embeddings, distances = [val], [val_embeddings], [val_distances]
    for split in (s for s in monitor.calibration_splits if s != "val"):
        frame = pd.read_csv(paths.splits / f"{split}.csv")
        split_embeddings = embed(extractor, frame.path.tolist(), params.data.preprocess, params.train.eval_batch_size)
        frames.append(frame)
        embeddings.append(split_embeddings)
        distances.append(neighbour_distance(train_embeddings, split_embeddings, monitor.ood_neighbours))
    pooled = pool(pd.concat(frames, ignore_index=True), np.concatenate(embeddings), np.concatenate(distances), None,
                  len(frames))
    pools = {check: val_pool if check == "class-mix shift" else pooled for check in CHECKS}
    log.info("calibrating drift thresholds on %d draws per batch size %s (%d scans in %d groups of %s; class mix: %d "
             "of val)", monitor.calibration_draws, monitor.calibration_sizes, len(pooled), len(pooled.group_rows),
             "+".join(monitor.calibration_splits), len(val_pool))
    calibration = calibrate(pools, monitor.calibration_sizes, monitor.calibration_draws, monitor.false_alarm_rate,
                            params.seed)
    calibration["splits"] = list(monitor.calibration_splits)
    for size, entry in calibration["sizes"].items():
        log.info("batches of %s: false alarms on %.1f%% of %d further batches (target %.1f%%)", size,
                 100 * entry["measured_false_alarm_rate"], monitor.calibration_draws, 100 * monitor.false_alarm_rate)
    return calibration


def build_reference(params: Params) -> dict:
    """Write the profile (see the module docstring) to params paths.reference; returns its summary."""
    import keras

    monitor, paths = params.monitor, params.paths
    name = monitor.embedding_model
    if name not in params.stack.models:
        raise ProjectError(f"params monitor.embedding_model = {name!r} is not one of stack.models "
                           f"({', '.join(params.stack.models)}): the registered ensemble only carries those; pick one")
    model_path = paths.models / name / "model.keras"
    val_predictions = paths.predictions / "stack" / "val.parquet"
    for needed, stage in ((model_path, f"train@{name}"), (val_predictions, "stack"),
                          (paths.splits / "train.csv", "split")):
        if not needed.exists():
            raise ProjectError(f"{needed} not found: run `dvc repro {stage}` (or `dvc pull`) first")
    train = pd.read_csv(paths.splits / "train.csv")
    val = pd.read_csv(paths.splits / "val.csv")
    extractor = embedding_extractor(keras.models.load_model(model_path))
    batch = params.train.eval_batch_size
    preprocess = params.data.preprocess
    train_embeddings = embed(extractor, train.path.tolist(), preprocess, batch)
    val_embeddings = embed(extractor, val.path.tolist(), preprocess, batch)
    distances = neighbour_distance(train_embeddings, val_embeddings, monitor.ood_neighbours)
    if len(distances) == 0:
        raise ProjectError(f"{paths.splits / 'val.csv'} holds no images: the OOD threshold is a percentile of val "
                           "images' distances; raise split.val_fraction")
    threshold = float(np.percentile(distances, monitor.ood_percentile))
    style = train[["path"]].merge(read_styles(params)[["path", *STYLE_FEATURES, "error"]], on="path", how="left",
                                  indicator=True)
    style.loc[style.pop("_merge") == "left_only", "error"] = f"not in {paths.style}"
    unreadable = style[style.error.notna()]
    if len(unreadable):
        log.warning("%d training images have no style features (left out): %s", len(unreadable),
                    "; ".join(f"{r.path}: {r.error}" for r in unreadable.head(5).itertuples()))
    val_frame = pd.read_parquet(val_predictions)
    counts = predicted_counts(val_frame, params.data.classes)
    total = max(sum(counts.values()), 1)
    class_mix = {c: n / total for c, n in counts.items()}
    calibration = calibrate_drift(params, extractor, train_embeddings, style[style.error.isna()], class_mix, threshold,
                                  val, val_embeddings, distances, val_frame)
    meta = {
        "embedding_model": name,
        "pool_layer": POOL_LAYER,
        "image_size": int(extractor.input_shape[1]),
        "embedding_width": int(train_embeddings.shape[1]),
        "preprocess": preprocess.model_dump(mode="json"),
        "neighbours": monitor.ood_neighbours,
        "ood_percentile": monitor.ood_percentile,
        "ood_threshold": threshold,
        "val_distance": {"median": float(np.median(distances)), "max": float(distances.max())},
        "training_images": len(train),
        "val_images": len(val),
        "classes": params.data.classes,
        "class_counts": counts,
        "class_mix": class_mix,
        "class_mix_from": str(val_predictions),
        "style_features": STYLE_FEATURES,
        "calibration": calibration,
    }
    out = paths.reference
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    columns = embedding_columns(train_embeddings.shape[1])
    pd.concat([train[["path", "label"]].reset_index(drop=True),
               pd.DataFrame(train_embeddings, columns=columns)], axis=1).to_parquet(out / EMBEDDINGS, index=False)
    style[style.error.isna()].drop(columns="error").reset_index(drop=True).to_parquet(out / STYLE, index=False)
    pd.DataFrame({"path": val.path, "label": val.label, "distance": distances}).to_parquet(out / VAL_DISTANCES,
                                                                                       index=False)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"out": str(out), "embedding_model": name, "training_images": len(train), "val_images": len(val),
            "ood_threshold": threshold, "class_mix": meta["class_mix"],
            "measured_false_alarm_rate": {size: entry["measured_false_alarm_rate"]
                                          for size, entry in calibration["sizes"].items()}}
