"""Which precision, compiler and `tf.distribute` strategy a run uses, from params and the devices.

Defaults follow the hardware: mixed precision and XLA on a GPU (float32 and no XLA on a CPU, where
XLA measured about twice as slow), one replica unless several GPUs are present.
"""

from __future__ import annotations

import tensorflow as tf

from params import Train


def gpus() -> list:
    return tf.config.list_logical_devices("GPU")


def precision_policy(setting: str, gpu_count: int) -> str:
    """Keras dtype policy: "mixed_float16" when asked for or on a GPU under "auto"."""
    if setting == "on" or (setting == "auto" and gpu_count > 0):
        return "mixed_float16"
    return "float32"


def use_xla(gpu_count: int) -> bool:
    return gpu_count > 0


def strategy_kind(setting: str, gpu_count: int) -> str:
    """"none", "mirrored" or "multi_worker": "auto" mirrors only when there are several GPUs."""
    if setting == "auto":
        return "mirrored" if gpu_count > 1 else "none"
    return setting


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The strategy for `kind`; "mirrored" spans all local GPUs, else all logical CPUs.

    MultiWorkerMirroredStrategy reads the cluster from the TF_CONFIG environment variable.
    """
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        devices = gpus() or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"train.distribute: unknown strategy {kind!r}")


def configure(train: Train, seed: int) -> tuple[tf.distribute.Strategy, bool]:
    """Seed everything and set the dtype policy; return the strategy and whether to use XLA."""
    import keras

    keras.utils.set_random_seed(seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    count = len(gpus())
    keras.mixed_precision.set_global_policy(precision_policy(train.mixed_precision, count))
    return make_strategy(strategy_kind(train.distribute, count)), use_xla(count)
