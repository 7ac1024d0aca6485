"""tf.data input pipeline from the split CSVs: decode and resize once, cache, then shuffle, augment, batch and
prefetch on the fly. Decoding goes through components.images, the same code the served ensemble uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from components.config import Augmentation, ModelParams, TrainParams
from components.images import load_rgb


def read_split(splits_dir: Path, split: str) -> pd.DataFrame:
    path = Path(splits_dir) / f"{split}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dvc repro split` (or `braintumor split`) first")
    return pd.read_csv(path)


def label_indices(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    unknown = set(frame.label) - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in data.classes {classes}")
    return frame.label.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)


def augmenter(augmentation: Augmentation, seed: int) -> keras.Sequential:
    layers = []
    if augmentation.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augmentation.rotation:
        layers.append(keras.layers.RandomRotation(augmentation.rotation, fill_mode="constant", seed=seed))
    if augmentation.zoom:
        layers.append(keras.layers.RandomZoom(augmentation.zoom, fill_mode="constant", seed=seed))
    if augmentation.contrast:
        layers.append(keras.layers.RandomContrast(augmentation.contrast, seed=seed))
    return keras.Sequential(layers, name="augmentation")


def make_dataset(frame: pd.DataFrame, classes: list[str], model: ModelParams, train: TrainParams, *,
                 training: bool, seed: int, cache_dir: Path | None = None, batch_size: int | None = None
                 ) -> tf.data.Dataset:
    """(images float32 0-255, label index) batches. Shuffled and augmented only when `training`."""
    size = model.image_size
    paths = frame.path.astype(str).to_numpy()
    labels = label_indices(frame, classes)

    def decode(path):
        return load_rgb(path.decode() if isinstance(path, bytes) else str(path), size).astype(np.float32)

    def load(path, label):
        image = tf.numpy_function(decode, [path], tf.float32, stateful=False)
        image.set_shape((size, size, 3))
        return image, label

    options = tf.data.Options()
    # Evaluation rows must come out in frame order: predictions are matched to paths by position.
    options.deterministic = train.deterministic or not training
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).with_options(options)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if train.cache == "memory":
        dataset = dataset.cache()
    elif train.cache == "disk":
        if cache_dir is None:
            raise ValueError("train.cache: disk needs a cache directory")
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]  # one cache file per distinct frame
        dataset = dataset.cache(str(cache_dir / f"{key}-{size}"))
    if training:
        dataset = dataset.shuffle(min(train.shuffle_buffer, len(frame)), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size or (model.batch_size if training else train.eval_batch_size))
    if training and any(model.augmentation.model_dump().values()):
        augment = augmenter(model.augmentation, seed)
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_images(frame: pd.DataFrame, size: int) -> np.ndarray:
    """All images of a frame as one (n, size, size, 3) float32 array (for Grad-CAM and in-memory baselines)."""
    return np.stack([load_rgb(p, size) for p in frame.path]).astype(np.float32)
