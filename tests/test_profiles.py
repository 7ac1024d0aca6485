"""The documented GPU profile applies cleanly to params.yaml, and its GPU-only switches select correctly on a CPU."""

import re

import keras
import pytest
import tensorflow as tf

from components import devices
from components.config import load_params
from components.devices import configure_tensorflow, cpu_flags, cpuinfo_value, precision_policy
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
        if gpu.pretrained(name):
            assert 0 < model.head_epochs < model.epochs and model.unfreeze_layers != 0, name


def test_mixed_precision_and_xla_switch_on_only_with_a_visible_gpu(monkeypatch, float32_policy_after):
    params = load_params(ROOT / "params.yaml", gpu_profile_overrides())
    on_cpu = configure_tensorflow(params.train, params.seed)
    assert on_cpu == {"gpus": 0, "mixed_precision": False, "precision": "float32", "jit_compile": False}
    assert keras.mixed_precision.global_policy().name == "float32"

    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake_gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: grown.append((gpu, on)))
    on_gpu = configure_tensorflow(params.train, params.seed)
    assert on_gpu == {"gpus": 1, "mixed_precision": True, "precision": "mixed_float16", "jit_compile": True}
    assert grown == [(fake_gpu, True)], "memory growth is on for the process's GPU"
    assert keras.mixed_precision.global_policy().name == "mixed_float16"

    # Under mixed precision the softmax still comes out in float32 (numerically safe probabilities).
    small = params.model("mobilenetv2").model_copy(update={"image_size": 32, "weights": "none"})
    model = build_model("mobilenetv2", small, params.train, len(params.data.classes))
    assert model.output.dtype == "float32"
    assert any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers)


def test_cpu_bfloat16_applies_only_on_a_cpu_with_bf16_units(monkeypatch, tmp_path, float32_policy_after):
    params = load_params(ROOT / "params.yaml", ["models.custom_cnn.cpu_bfloat16=true"])
    asked = params.model("custom_cnn").cpu_bfloat16
    assert asked and not params.model("resnet50").cpu_bfloat16, "one model's key leaves the others alone"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: some Xeon\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    with_units, without = cpu_flags(cpuinfo), frozenset({"fpu", "avx2"})
    assert "amx_bf16" in with_units and cpu_flags(tmp_path / "missing") == frozenset()
    assert cpuinfo_value("model name", cpuinfo) == "some Xeon" and cpuinfo_value("model", cpuinfo) == ""
    assert precision_policy(params.train, asked, 0, with_units) == "mixed_bfloat16"
    assert precision_policy(params.train, asked, 0, without) == "float32"
    assert precision_policy(params.train, asked, 1, with_units) == "float32", "a GPU takes train.mixed_precision"
    assert precision_policy(params.train, False, 0, with_units) == "float32"

    # Asked for on a CPU without the units: float32, and a warning that names the key.
    monkeypatch.setattr(devices, "cpu_flags", lambda: without)
    with pytest.warns(UserWarning, match="cpu_bfloat16"):
        setup = configure_tensorflow(params.train, params.seed, asked)
    assert setup["precision"] == "float32" and keras.mixed_precision.global_policy().name == "float32"
    monkeypatch.setattr(devices, "cpu_flags", lambda: with_units)
    assert configure_tensorflow(params.train, params.seed, asked)["precision"] == "mixed_bfloat16"
    small = params.model("custom_cnn").model_copy(update={"image_size": 32})
    model = build_model("custom_cnn", small, params.train, len(params.data.classes))
    assert model.output.dtype == "float32", "the softmax stays float32 under bfloat16 too"
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in model.layers)
