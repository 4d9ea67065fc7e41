"""Precision, compilation and data parallelism of a run, from params, the backend and the devices.

Defaults follow the hardware and the backend:
- precision: under `auto`, mixed precision on a GPU in the type each backend does well, float16 on
  TensorFlow, bfloat16 on JAX; float32 on a CPU. `on` asks for mixed precision on a CPU too, in
  bfloat16, the type CPUs compute natively: with the `avx512_bf16` or `amx_bf16` flag in
  /proc/cpuinfo oneDNN runs it at 1.6x the float32 step (2-core AVX512-BF16 EPYC); elsewhere it is
  emulated (10x slower than float32 on a 2-core AVX2 EPYC) and `configure` says so on stderr.
  `auto` keeps CPUs at float32 because bfloat16 cost accuracy there: the recipe + cutout scored
  0.46 points less test accuracy over three seeds, beyond the seed spread (docs/performance.md).
  The softmax and the loss stay float32 (model.py).
- compilation: XLA on a TensorFlow GPU (on a CPU it measured about twice as slow); JAX always
  compiles with XLA, its own compiler
- parallelism: one device, or data-parallel over all local GPUs when there are several, through the
  backend's own API: `tf.distribute.MirroredStrategy` on TensorFlow,
  `keras.distribution.DataParallel` on JAX
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from params import Train

MIXED = {"tensorflow": "mixed_float16", "jax": "mixed_bfloat16"}
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Setup:
    """What `configure` chose; `scope()` is where models must be built or loaded."""
    policy: str
    xla: bool
    replicas: int
    scope: Callable[[], contextlib.AbstractContextManager]

    def describe(self) -> dict:
        return {"backend": keras.backend.backend(), "policy": self.policy, "xla": self.xla,
                "replicas": self.replicas}

    def tags(self) -> dict[str, str]:
        """MLflow tags of a run trained under this setup: `devices.policy` and the others."""
        return {f"devices.{key}": str(value) for key, value in self.describe().items()}


def gpus() -> list:
    if keras.backend.backend() == "jax":
        import jax

        return [device for device in jax.devices() if device.platform == "gpu"]
    import tensorflow as tf

    return tf.config.list_logical_devices("GPU")


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (`flags` on x86, `Features` on Arm), empty when unknown."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def precision_policy(setting: str, gpu_count: int, backend: str) -> str:
    """Keras dtype policy: float32 when "off", and under "auto" on a CPU; otherwise mixed
    precision, in the backend's type on a GPU and in bfloat16 on a CPU."""
    if setting == "off" or (setting == "auto" and gpu_count == 0):
        return "float32"
    return MIXED[backend] if gpu_count else "mixed_bfloat16"


@functools.cache  # once per process, not once per tuning trial
def _say_emulated() -> None:
    print("train.mixed_precision: on: this CPU has no native bfloat16 (no avx512_bf16 or "
          "amx_bf16 flag): bfloat16 is emulated and slower than float32; `off` trains float32",
          file=sys.stderr)


def use_xla(gpu_count: int, backend: str) -> bool:
    return backend == "jax" or gpu_count > 0


def parallel(setting: str, gpu_count: int) -> bool:
    """Whether to split batches over devices: "auto" does with two GPUs or more."""
    return setting == "data_parallel" or (setting == "auto" and gpu_count > 1)


def _data_parallel(backend: str, devices: list) -> tuple[int, Callable]:
    if backend == "jax":
        import jax

        devices = devices or jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return len(devices), contextlib.nullcontext
    import tensorflow as tf

    devices = devices or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    return strategy.num_replicas_in_sync, strategy.scope


def configure(train: Train, seed: int) -> Setup:
    """Seed everything, set the dtype policy and the distribution; return what was chosen."""
    backend = keras.backend.backend()
    keras.utils.set_random_seed(seed)
    if train.deterministic and backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    found = gpus()
    policy = precision_policy(train.mixed_precision, len(found), backend)
    if policy == "mixed_bfloat16" and not found and not native_bf16():
        _say_emulated()
    keras.mixed_precision.set_global_policy(policy)
    replicas, scope = 1, contextlib.nullcontext
    if parallel(train.distribute, len(found)):
        replicas, scope = _data_parallel(backend, found)
    return Setup(policy, use_xla(len(found), backend), replicas, scope)
