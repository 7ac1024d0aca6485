"""Grad-CAM overlays (`braintumor explain IMAGE --model NAME`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.config import DataParams
from components.images import load_rgb


def feature_index(layers) -> int:
    """Index of the last layer with a spatial (4-D) output: the backbone, or the custom CNN's last block."""
    spatial = [i for i, layer in enumerate(layers) if len(layer.output.shape) == 4 and layer.name != "preprocess"]
    if not spatial:
        raise ValueError("model has no spatial layer to explain")
    return spatial[-1]


def gradcam(model, image: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(heatmap in [0, 1] at the image's size, explained class, probabilities) for one (H, W, 3) image."""
    import keras
    import tensorflow as tf

    # Our models are chains (input, preprocess, backbone or conv blocks, pooling, head), so the forward pass is
    # split at the feature map by calling the layers in order; a nested backbone exposes no inner tensor.
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    cut = feature_index(layers)
    with tf.GradientTape() as tape:
        features = tf.convert_to_tensor(image[None].astype(np.float32))
        for layer in layers[: cut + 1]:
            features = layer(features, training=False)
        tape.watch(features)
        probabilities = features
        for layer in layers[cut + 1:]:
            probabilities = layer(probabilities, training=False)
        target = int(tf.argmax(probabilities[0])) if class_index is None else class_index
        score = probabilities[:, target]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))[0].numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    heatmap = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(image.shape[1::-1],
                                                                              Image.Resampling.BILINEAR)) / 255.0
    return heatmap, target, probabilities[0].numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    import matplotlib

    colored = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255
    return Image.fromarray((image * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8))


def explain_image(image_path: Path, model_path: Path, data: DataParams, out: Path) -> dict:
    import keras

    model = keras.models.load_model(model_path)
    size = model.input_shape[1]
    image = load_rgb(image_path, size, data.preprocess).astype(np.float32)
    heatmap, target, probabilities = gradcam(model, image)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, heatmap).resize((max(size, 224), max(size, 224))).save(out)
    return {"image": str(image_path), "model": str(model_path), "explained_class": data.classes[target],
            "probabilities": dict(zip(data.classes, map(float, probabilities))), "overlay": str(out)}
