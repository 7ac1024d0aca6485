"""The four CNNs. Every model takes raw RGB images (0-255, image_size x image_size x 3) and outputs softmax
probabilities over the classes: the architecture's own `preprocess_input` is folded into the first layer, so
training, evaluation, Grad-CAM and serving all feed the same decoded pixels."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from components.config import ModelParams, ParamsError, ProjectError, TrainParams, is_pretrained

KERAS_CACHE = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


@dataclass(frozen=True)
class Architecture:
    application: Callable[..., keras.Model] | None  # keras.applications constructor; None for the custom CNN
    preprocess: Callable[[np.ndarray], np.ndarray]


def _applications() -> dict[str, Architecture]:
    apps = keras.applications
    return {
        "custom_cnn": Architecture(None, lambda x: x / 255.0),
        "mobilenetv2": Architecture(apps.MobileNetV2, apps.mobilenet_v2.preprocess_input),
        "densenet169": Architecture(apps.DenseNet169, apps.densenet.preprocess_input),
        "resnet50": Architecture(apps.ResNet50, apps.resnet50.preprocess_input),
    }


ARCHITECTURES = _applications()
MODEL_NAMES = tuple(ARCHITECTURES)


class WeightsUnavailable(ProjectError):
    pass


def preprocess_layer(preprocess: Callable[[np.ndarray], np.ndarray]) -> keras.layers.Layer:
    """A frozen 1x1 convolution equal to `preprocess`, which for every Keras application is a per-channel affine
    map (scale, mean, and for caffe-style models an RGB->BGR swap). Its weights are read off the function itself,
    so the saved model needs no custom layer to load."""
    bias = np.asarray(preprocess(np.zeros((1, 1, 1, 3), dtype=np.float32)), dtype=np.float32).reshape(3)
    kernel = np.stack([np.asarray(preprocess(np.eye(3, dtype=np.float32)[i].reshape(1, 1, 1, 3) * 1.0),
                                  dtype=np.float32).reshape(3) - bias for i in range(3)])
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    layer.set_weights([kernel.reshape(1, 1, 3, 3), bias])
    return layer


def _backbone(name: str, params: ModelParams, inputs: keras.KerasTensor) -> keras.Model:
    application = ARCHITECTURES[name].application
    weights = params.weights
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise WeightsUnavailable(f"models.{name}.weights = {weights!r} is not a file; use imagenet, none or a path "
                                 "to a .weights.h5 file")
    try:
        backbone = application(include_top=False, weights=None if weights == "none" else weights,
                               input_shape=(params.image_size, params.image_size, 3), pooling=None)
    except Exception as exc:  # Keras raises URLError/OSError/HTTP errors when the download fails
        if weights != "imagenet":
            raise
        raise WeightsUnavailable(
            f"could not download ImageNet weights for {name} ({type(exc).__name__}: {exc}). Either put the weights "
            f"file in the Keras cache ({KERAS_CACHE}/, e.g. copied from a machine with network), or set "
            f"models.{name}.weights: none in params.yaml to train from scratch.") from None
    if weights == "none":
        # From scratch on a small budget the default momentum (0.99-0.999) leaves the moving statistics far from
        # the batch statistics, and the model predicts one class in inference mode.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = params.bn_momentum
    return backbone


def _custom_cnn(params: ModelParams, x: keras.KerasTensor) -> keras.KerasTensor:
    for filters in params.filters:
        for _ in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=params.bn_momentum)(x)
            x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.layers.GlobalAveragePooling2D(name="pool")(x)  # named as the backbones' pool: embeddings, Grad-CAM


def build_model(name: str, params: ModelParams, train: TrainParams, num_classes: int) -> keras.Model:
    """Preprocessing, backbone, then the shared head (dropout, dense, softmax)."""
    if name not in ARCHITECTURES:
        raise ParamsError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    inputs = keras.Input((params.image_size, params.image_size, 3), name="image")
    x = preprocess_layer(ARCHITECTURES[name].preprocess)(inputs)
    if name == "custom_cnn":
        x = _custom_cnn(params, x)
    else:
        backbone = _backbone(name, params, inputs)
        # Pretrained BatchNorm stays in inference mode while fine-tuning (Keras transfer-learning guide).
        x = backbone(x, training=False) if is_pretrained(name, params.weights) else backbone(x)
        # Pooling outside the backbone keeps its feature map reachable for Grad-CAM.
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(train.head_dropout)(x)
    if train.head_units:
        x = keras.layers.Dense(train.head_units, activation="relu")(x)
        x = keras.layers.Dropout(train.head_dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def backbone_of(model: keras.Model) -> keras.Model | None:
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[0] if nested else None


def set_trainable(model: keras.Model, phase: str, unfreeze_layers: int) -> None:
    """phase 'full' (from scratch): every layer trains. phase 'head': backbone frozen. phase 'fine_tune': top
    `unfreeze_layers` backbone layers trainable (BatchNorm layers stay frozen). Models without a backbone train
    whole in every phase."""
    backbone = backbone_of(model)
    if backbone is None:
        return
    backbone.trainable = phase != "head"
    if phase == "full":
        for layer in backbone.layers:
            layer.trainable = True
        return
    if phase == "fine_tune" and unfreeze_layers >= 0:
        cut = len(backbone.layers) - unfreeze_layers
        for index, layer in enumerate(backbone.layers):
            layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
