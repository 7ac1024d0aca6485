import keras
import numpy as np
import pytest

from components.config import load_params
from components.models import ARCHITECTURES, MODEL_NAMES, WeightsUnavailable, build_model, preprocess_layer
from tests.conftest import ROOT, TINY_TRAINING


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml", [o.format(m=m) for m in MODEL_NAMES for o in TINY_TRAINING])


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "custom_cnn"])
def test_folded_preprocessing_equals_the_architectures_preprocess_input(name):
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    expected = ARCHITECTURES[name].preprocess(images.copy())
    got = keras.ops.convert_to_numpy(preprocess_layer(ARCHITECTURES[name].preprocess)(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_builds_and_trains_a_step_on_tiny_images(name, params):
    model = build_model(name, params.model(name), params.train, num_classes=4)
    # Eager: tracing DenseNet169's Adam train step costs ~100 s on 2 cores, the eager step ~10 s.
    model.compile("adam", "sparse_categorical_crossentropy", run_eagerly=True)
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(images, np.array([0, 1, 2, 3]))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "weights did not move"
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_from_scratch_batchnorm_momentum_comes_from_params(params):
    model = build_model("mobilenetv2", params.model("mobilenetv2"), params.train, 4)
    backbone = [l for l in model.layers if isinstance(l, keras.Model)][0]
    momenta = {l.momentum for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)}
    assert momenta == {params.model("mobilenetv2").bn_momentum}


def test_imagenet_weights_without_network_fail_with_the_fix(params, tmp_path, monkeypatch):
    import urllib.error

    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    def no_route(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host (simulated)")

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))  # an empty Keras cache
    monkeypatch.setattr(file_utils, "urlretrieve", no_route)  # the download fails, with or without a network
    model_params = params.model("mobilenetv2").model_copy(update={"weights": "imagenet"})
    with pytest.raises(WeightsUnavailable) as failure:
        build_model("mobilenetv2", model_params, params.train, 4)
    message = str(failure.value)
    assert "Keras cache" in message and "weights: none" in message and "mobilenetv2" in message


def test_missing_weights_file_is_named(params):
    model_params = params.model("resnet50").model_copy(update={"weights": "/nowhere/resnet.weights.h5"})
    with pytest.raises(WeightsUnavailable, match="/nowhere/resnet.weights.h5"):
        build_model("resnet50", model_params, params.train, 4)


def test_from_scratch_trains_every_layer_and_fine_tuning_only_the_top(params):
    from components.models import backbone_of, set_trainable
    from components.train import _phases

    scratch = params.model("mobilenetv2")
    assert [phase for phase, *_ in _phases("mobilenetv2", scratch)] == ["full"]
    model = build_model("mobilenetv2", scratch, params.train, 4)
    set_trainable(model, "full", scratch.unfreeze_layers)
    backbone = backbone_of(model)
    assert all(layer.trainable for layer in backbone.layers)
    assert len(model.trainable_weights) > 100

    pretrained = scratch.model_copy(update={"weights": "imagenet", "head_epochs": 2, "epochs": 5})
    assert [phase for phase, *_ in _phases("mobilenetv2", pretrained)] == ["head", "fine_tune"]
    set_trainable(model, "head", 10)
    assert not backbone.trainable
    set_trainable(model, "fine_tune", 10)
    trainable = [layer for layer in backbone.layers if layer.trainable]
    assert 0 < len(trainable) <= 10
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)


def test_pretrained_has_one_definition_and_custom_cnn_refuses_weights():
    from components.config import ParamsError
    from components.train import _phases

    with pytest.raises(ParamsError, match="models.custom_cnn.weights = 'imagenet'.*set models.custom_cnn.weights: none"):
        load_params(ROOT / "params.yaml", ["models.custom_cnn.weights=imagenet"])
    params = load_params(ROOT / "params.yaml", ["models.resnet50.weights=imagenet"])
    assert params.pretrained("resnet50") and not params.pretrained("custom_cnn")
    # custom_cnn given imagenet weights by hand (past the params check) still trains in one phase with every layer
    custom = params.model("custom_cnn").model_copy(update={"weights": "imagenet", "head_epochs": 2})
    assert [phase for phase, *_ in _phases("custom_cnn", custom)] == ["full"]
    assert [phase for phase, *_ in _phases("resnet50", params.model("resnet50"))][0] == "head"
