"""The training-time augmentations that break contrast and sequence cues (components.dataset)."""

import numpy as np
import pytest

from components.dataset import RandomGamma, RandomLowResolution, augmenter
from tests.conftest import class_image


def off(params, **on):
    """The custom CNN's augmentation with everything off but `on`."""
    base = params.model("custom_cnn").augmentation
    zero = {k: (False if isinstance(v, bool) else 0.0) for k, v in base.model_dump().items()}
    return base.model_copy(update={**zero, "low_resolution_min_scale": 0.5, **on})


@pytest.fixture
def batch() -> np.ndarray:
    rng = np.random.default_rng(0)
    images = [np.asarray(class_image(i % 4, rng, size=32, mode="RGB"), dtype=np.float32) for i in range(8)]
    return np.stack(images)


def test_inversion_with_probability_one_maps_every_pixel_to_its_complement(params, batch):
    out = np.asarray(augmenter(off(params, invert=1.0), seed=1)(batch, training=True))
    np.testing.assert_allclose(out, 255.0 - batch, atol=1e-3)


def test_gamma_remaps_intensities_monotonically_and_keeps_the_range(batch):
    out = np.asarray(RandomGamma(0.5, seed=3)(batch, training=True))
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, batch)
    for image, changed in zip(batch, out):  # monotonic: the order of the pixels is kept within each image
        order = np.argsort(image.ravel(), kind="stable")
        assert (np.diff(changed.ravel()[order]) >= -1e-3).all()
    np.testing.assert_array_equal(np.asarray(RandomGamma(0.5, seed=3)(batch, training=False)), batch)


def test_low_resolution_loses_detail_but_keeps_the_shape(batch):
    out = np.asarray(RandomLowResolution(1.0, 0.25, seed=0)(batch, training=True))
    assert out.shape == batch.shape
    detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert detail(out) < detail(batch)
    np.testing.assert_array_equal(np.asarray(RandomLowResolution(0.0, 0.25, seed=0)(batch, training=True)), batch)


def test_noise_and_blur_stay_in_the_pixel_range(params, batch):
    out = np.asarray(augmenter(off(params, noise=0.2, blur=1.0), seed=2)(batch, training=True))
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, batch)


def test_loss_weights_stay_with_their_scans_through_shuffling_and_augmentation(params, tmp_path):
    import pandas as pd

    from components.dataset import make_dataset

    rng = np.random.default_rng(0)
    classes = params.data.classes
    rows = []
    for index in range(24):
        path = tmp_path / f"{index}.png"
        class_image(index % 4, rng, size=32, mode="RGB").save(path)
        rows.append({"path": str(path), "label": classes[index % 4]})
    frame = pd.DataFrame(rows)
    weights = np.arange(len(frame), dtype=np.float32) / 10  # a different weight for every scan
    model = params.model("custom_cnn").model_copy(update={"image_size": 32, "batch_size": 5})
    dataset = make_dataset(frame, params.data, model, params.train, training=True, seed=3, weights=weights)
    seen = []
    for images, labels, batch_weights in dataset:
        assert images.shape[1:] == (32, 32, 3)
        seen += list(zip(labels.numpy().tolist(), batch_weights.numpy().round(3).tolist()))
    expected = sorted(zip((np.arange(24) % 4).tolist(), weights.round(3).tolist()))
    assert sorted(seen) == expected, "every scan's weight arrives with that scan's label"
    assert [w for _, w in seen] != sorted(w for _, w in seen), "the rows were shuffled"
