"""The documented GPU profile applies cleanly to params.yaml, and its GPU-only switches select correctly on a CPU."""

import re

import keras
import pytest
import tensorflow as tf

from components.config import load_params
from components.devices import configure_tensorflow
from components.models import build_model
from tests.conftest import ROOT

PRETRAINED = ["mobilenetv2", "densenet169", "resnet50"]


def gpu_profile_overrides() -> list[str]:
    text = (ROOT / "docs" / "profiles.md").read_text()
    block = re.search(r"```bash\n(dvc exp run .*?)```", text, re.S).group(1)
    return re.findall(r"-S (\S+=\S+)", block)


@pytest.fixture
def float32_policy_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_every_gpu_profile_override_exists_validates_and_changes_something():
    cpu = load_params(ROOT / "params.yaml")
    overrides = gpu_profile_overrides()
    assert overrides, "docs/profiles.md has no `dvc exp run -S` block"
    gpu = load_params(ROOT / "params.yaml", overrides)  # raises on an unknown key or an invalid value
    cpu_values, gpu_values = cpu.model_dump(by_alias=True), gpu.model_dump(by_alias=True)
    for override in overrides:
        key = override.split("=", 1)[0]
        before, after = cpu_values, gpu_values
        for part in key.split("."):
            before, after = before[part], after[part]
        assert before != after, f"docs/profiles.md: -S {override} is what params.yaml already says"
    for name in PRETRAINED:  # a pretrained backbone gets a head phase, then fine-tuning of its top layers
        model = gpu.model(name)
        if model.pretrained:
            assert 0 < model.head_epochs < model.epochs and model.unfreeze_layers != 0, name


def test_mixed_precision_and_xla_switch_on_only_with_a_visible_gpu(monkeypatch, float32_policy_after):
    params = load_params(ROOT / "params.yaml", gpu_profile_overrides())
    on_cpu = configure_tensorflow(params.train, params.seed)
    assert on_cpu == {"gpus": 0, "mixed_precision": False, "jit_compile": False}
    assert keras.mixed_precision.global_policy().name == "float32"

    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake_gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: grown.append((gpu, on)))
    on_gpu = configure_tensorflow(params.train, params.seed)
    assert on_gpu == {"gpus": 1, "mixed_precision": True, "jit_compile": True}
    assert grown == [(fake_gpu, True)], "memory growth is on for the process's GPU"
    assert keras.mixed_precision.global_policy().name == "mixed_float16"

    # Under mixed precision the softmax still comes out in float32 (numerically safe probabilities).
    small = params.model("mobilenetv2").model_copy(update={"image_size": 32, "weights": "none"})
    model = build_model("mobilenetv2", small, params.train, len(params.data.classes))
    assert model.output.dtype == "float32"
    assert any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers)
