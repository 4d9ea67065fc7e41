"""Precision, compilation and data parallelism of a run, from params, the backend and the devices.

Defaults follow the hardware and the backend:
- precision: float32 on a CPU; on a GPU mixed precision in the type each backend does well,
  float16 on TensorFlow, bfloat16 on JAX (the softmax and the loss stay float32: see model.py)
- compilation: XLA on a TensorFlow GPU (on a CPU it measured about twice as slow); JAX always
  compiles with XLA, its own compiler
- parallelism: one device, or data-parallel over all local GPUs when there are several, through the
  backend's own API: `tf.distribute.MirroredStrategy` on TensorFlow,
  `keras.distribution.DataParallel` on JAX
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import keras

from params import Train

MIXED = {"tensorflow": "mixed_float16", "jax": "mixed_bfloat16"}


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


def gpus() -> list:
    if keras.backend.backend() == "jax":
        import jax

        return [device for device in jax.devices() if device.platform == "gpu"]
    import tensorflow as tf

    return tf.config.list_logical_devices("GPU")


def precision_policy(setting: str, gpu_count: int, backend: str) -> str:
    """Keras dtype policy: the backend's mixed type when asked for or on a GPU under "auto"."""
    if setting == "on" or (setting == "auto" and gpu_count > 0):
        return MIXED[backend]
    return "float32"


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
    keras.mixed_precision.set_global_policy(policy)
    replicas, scope = 1, contextlib.nullcontext
    if parallel(train.distribute, len(found)):
        replicas, scope = _data_parallel(backend, found)
    return Setup(policy, use_xla(len(found), backend), replicas, scope)
