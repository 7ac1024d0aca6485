"""Devices: TensorFlow set-up inside one training process, and the GPU slots that keep one training per GPU.

The slot logic never imports TensorFlow, so the scheduler can be tested with fake GPU ids on a CPU machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.config import DeviceParams, ParamsError, TrainParams

GPUS_ENV = "BRAINTUMOR_GPUS"  # comma-separated GPU ids; overrides params devices.gpus ("" means CPU only)


def detect_gpus() -> list[int]:
    """GPU ids from nvidia-smi, without importing TensorFlow in the scheduling process."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                          text=True)
    return [int(line) for line in done.stdout.split()] if done.returncode == 0 else []


def resolve_gpus(params: DeviceParams) -> list[int]:
    """The GPU ids trainings may use: env BRAINTUMOR_GPUS, else params devices.gpus, else detection."""
    if GPUS_ENV in os.environ:
        text = os.environ[GPUS_ENV].strip()
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ParamsError(f"{GPUS_ENV}={text!r} must be comma-separated GPU ids, e.g. 0,1") from None
    if params.gpus == "auto":
        return detect_gpus()
    return list(params.gpus)


class DeviceSlots:
    """A pool of devices: with GPUs, one slot per GPU id; without, `cpu_concurrency` CPU slots (id None).

    `acquire()` blocks until a slot is free, so at most len(slots) trainings run at once and no two share a GPU.
    """

    def __init__(self, gpus: list[int], cpu_concurrency: int = 1):
        self.gpus = list(gpus)
        self._free: list[int | None] = list(gpus) if gpus else [None] * cpu_concurrency
        self._condition = threading.Condition()

    @property
    def capacity(self) -> int:
        return len(self.gpus) or len(self._free)

    @contextmanager
    def acquire(self) -> Iterator[int | None]:
        with self._condition:
            self._condition.wait_for(lambda: bool(self._free))
            device = self._free.pop(0)
        try:
            yield device
        finally:
            with self._condition:
                self._free.append(device)
                self._condition.notify()


def process_env(device: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for one training process: it sees exactly its GPU, or none."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = "" if device is None else str(device)
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


# The CPU units TensorFlow's oneDNN kernels use for bfloat16; without one, bfloat16 is emulated and slower.
BFLOAT16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpuinfo_value(key: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's `key` line of `cpuinfo` ('' where it cannot be read, as off Linux, or has no such key)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), "")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where `cpuinfo` cannot be read)."""
    return frozenset(cpuinfo_value("flags", cpuinfo).split())


def precision_policy(train: TrainParams, cpu_bfloat16: bool, gpus: int, flags: frozenset[str]) -> str:
    """The Keras dtype policy of a training: float16 on a GPU (`train.mixed_precision`), bfloat16 on a CPU with
    bf16 units (the model's `cpu_bfloat16`), float32 otherwise."""
    if gpus:
        return "mixed_float16" if train.mixed_precision else "float32"
    return "mixed_bfloat16" if cpu_bfloat16 and flags & BFLOAT16_CPU_FLAGS else "float32"


def configure_tensorflow(train: TrainParams, seed: int, cpu_bfloat16: bool = False) -> dict[str, object]:
    """Inside a training process: memory growth, seeds, determinism; the precision policy; XLA only on a GPU."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    keras.utils.set_random_seed(seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = precision_policy(train, cpu_bfloat16, len(gpus), cpu_flags())
    if cpu_bfloat16 and not gpus and policy == "float32":
        warnings.warn("params.yaml models.<model>.cpu_bfloat16 is true, but this CPU has none of "
                      f"{sorted(BFLOAT16_CPU_FLAGS)} in /proc/cpuinfo (bfloat16 would be emulated, slower): "
                      "training in float32", stacklevel=2)
    keras.mixed_precision.set_global_policy(policy)
    return {"gpus": len(gpus), "mixed_precision": policy != "float32", "precision": policy,
            "jit_compile": bool(gpus) and train.xla}
