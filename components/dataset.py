"""tf.data input pipeline from the split CSVs: decode and prepare once (components.images: grayscale, head crop,
per-image standardisation, aspect-preserving resize; the same code the served ensemble runs), cache, then shuffle,
augment, batch and prefetch on the fly.

Augmentation has two parts. Geometry (flip, rotation, zoom) and contrast come from Keras layers. The rest breaks
the MRI sequence and source cues the models otherwise learn (docs/audit.md): random gamma (an intensity remapping),
inversion (a T1-like scan with bright fluid looks T2-like), blur, noise and a lower resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from components.config import Augmentation, DataParams, ModelParams, Preprocess, TrainParams
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


class RandomGamma(keras.layers.Layer):
    """x -> 255 (x / 255) ** gamma per image, log(gamma) uniform in [-max_log_gamma, max_log_gamma]: remaps the
    intensities monotonically, so tissue contrast changes while anatomy stays. (Keras has no gamma layer.)"""

    def __init__(self, max_log_gamma: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_log_gamma, self.generator = max_log_gamma, keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        log_gamma = keras.random.uniform((keras.ops.shape(images)[0], 1, 1, 1), -self.max_log_gamma,
                                         self.max_log_gamma, seed=self.generator)
        return 255.0 * keras.ops.power(keras.ops.clip(images / 255.0, 0.0, 1.0), keras.ops.exp(log_gamma))


class RandomLowResolution(keras.layers.Layer):
    """With probability `rate`, a batch goes down to `min_scale` to 1 times its side and back (bilinear): the
    detail of a coarser scanner or a re-encoded copy. One draw per batch keeps it a single resize op."""

    def __init__(self, rate: float, min_scale: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.min_scale, self.generator = rate, min_scale, keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        draw = keras.random.uniform((2,), seed=self.generator)
        side = keras.ops.shape(images)[1]
        low = keras.ops.maximum(keras.ops.cast(keras.ops.cast(side, "float32") * (
            self.min_scale + (1.0 - self.min_scale) * draw[1]), "int32"), 4)
        coarse = tf.image.resize(tf.image.resize(images, (low, low)), (side, side))
        return tf.where(draw[0] < self.rate, coarse, images)


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
    if augmentation.gamma:
        layers.append(RandomGamma(augmentation.gamma, seed=seed))
    if augmentation.invert:
        # (p, p): invert with probability p. A single float f would draw the probability from U(0, f).
        layers.append(keras.layers.RandomInvert((augmentation.invert, augmentation.invert), value_range=(0, 255),
                                                seed=seed))
    if augmentation.blur:
        layers.append(keras.layers.RandomGaussianBlur(augmentation.blur, kernel_size=5, sigma=(0.1, 1.5),
                                                      value_range=(0, 255), seed=seed))
    if augmentation.noise:  # GaussianNoise takes a standard deviation in 0..1: noise on the 0..1 scale
        layers += [keras.layers.Rescaling(1 / 255), keras.layers.GaussianNoise(augmentation.noise, seed=seed),
                   keras.layers.Rescaling(255)]
    if augmentation.low_resolution:
        layers.append(RandomLowResolution(augmentation.low_resolution, augmentation.low_resolution_min_scale,
                                          seed=seed))
    if augmentation.noise or augmentation.contrast or augmentation.blur:
        layers.append(keras.layers.Lambda(lambda x: keras.ops.clip(x, 0.0, 255.0), name="clip_to_pixel_range"))
    return keras.Sequential(layers, name="augmentation")


def make_dataset(frame: pd.DataFrame, data: DataParams, model: ModelParams, train: TrainParams, *,
                 training: bool, seed: int, cache_dir: Path | None = None, batch_size: int | None = None,
                 weights: np.ndarray | None = None) -> tf.data.Dataset:
    """(images float32 0-255, label index) batches, or (images, label index, weight) with per-row loss `weights`.
    Shuffled and augmented only when `training`."""
    size = model.image_size
    paths = frame.path.astype(str).to_numpy()
    labels = label_indices(frame, data.classes)
    # Weights ride in each element with their image, so no shuffle or parallel map can pair them with another.
    columns = (paths, labels) if weights is None else (paths, labels, np.asarray(weights, np.float32))

    def decode(path):
        path = path.decode() if isinstance(path, bytes) else str(path)
        return load_rgb(path, size, data.preprocess).astype(np.float32)

    def load(path, *targets):
        image = tf.numpy_function(decode, [path], tf.float32, stateful=False)
        image.set_shape((size, size, 3))
        return image, *targets

    options = tf.data.Options()
    # Evaluation rows must come out in frame order: predictions are matched to paths by position.
    options.deterministic = train.deterministic or not training
    dataset = tf.data.Dataset.from_tensor_slices(columns).with_options(options)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if train.cache == "memory":
        dataset = dataset.cache()
    elif train.cache == "disk":
        if cache_dir is None:
            raise ValueError("train.cache: disk needs a cache directory")
        cache_dir.mkdir(parents=True, exist_ok=True)
        # One cache file per distinct frame, decode path and weights: a cache made otherwise is never read.
        key = hashlib.sha1("\n".join([*paths, data.preprocess.model_dump_json()]).encode()
                           + (b"" if weights is None else columns[2].tobytes())).hexdigest()[:12]
        dataset = dataset.cache(str(cache_dir / f"{key}-{size}"))
    if training:
        dataset = dataset.shuffle(min(train.shuffle_buffer, len(frame)), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size or (model.batch_size if training else train.eval_batch_size))
    if training and any(model.augmentation.model_dump().values()):
        augment = augmenter(model.augmentation, seed)
        dataset = dataset.map(lambda x, *targets: (augment(x, training=True), *targets),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_images(frame: pd.DataFrame, size: int, preprocess: Preprocess) -> np.ndarray:
    """All images of a frame as one (n, size, size, 3) float32 array (for Grad-CAM and in-memory baselines)."""
    return np.stack([load_rgb(p, size, preprocess) for p in frame.path]).astype(np.float32)
