"""Precision, XLA and strategy choices of src/devices.py for CPU-only and GPU machines.

The pure choices are tested for any GPU count; the checks of the real devices expect the CPU-only
machine the suite runs on, and are skipped where a GPU is present.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import devices
from params import load_params

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
cpu_only = pytest.mark.skipif(HAS_GPU, reason="a GPU is present")


@pytest.mark.parametrize(("setting", "gpu_count", "policy"), [
    ("auto", 0, "float32"),
    ("auto", 1, "mixed_float16"),
    ("auto", 2, "mixed_float16"),
    ("on", 0, "mixed_float16"),
    ("on", 1, "mixed_float16"),
    ("off", 0, "float32"),
    ("off", 1, "float32"),
    ("off", 4, "float32"),
])
def test_precision_policy(setting, gpu_count, policy):
    assert devices.precision_policy(setting, gpu_count) == policy


@pytest.mark.parametrize(("setting", "gpu_count", "kind"), [
    ("auto", 0, "none"),
    ("auto", 1, "none"),
    ("auto", 2, "mirrored"),
    ("auto", 8, "mirrored"),
    ("none", 2, "none"),           # an explicit setting wins over the device count
    ("mirrored", 0, "mirrored"),
    ("mirrored", 1, "mirrored"),
    ("multi_worker", 0, "multi_worker"),
])
def test_strategy_kind(setting, gpu_count, kind):
    assert devices.strategy_kind(setting, gpu_count) == kind


@pytest.mark.parametrize(("gpu_count", "xla"), [(0, False), (1, True), (2, True)])
def test_use_xla_only_on_gpus(gpu_count, xla):
    assert devices.use_xla(gpu_count) is xla


@cpu_only
def test_no_gpus_on_a_cpu_machine():
    assert devices.gpus() == []


def test_none_is_the_default_strategy():
    strategy = devices.make_strategy("none")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1


@cpu_only
def test_mirrored_without_gpus_spans_the_cpus():
    strategy = devices.make_strategy("mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_unknown_strategy_names_the_key():
    with pytest.raises(ValueError, match="train.distribute"):
        devices.make_strategy("parameter_server")


@pytest.fixture
def restore_policy():
    previous = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(previous)


@cpu_only
@pytest.mark.usefixtures("restore_policy")
@pytest.mark.parametrize(("setting", "policy"), [("auto", "float32"), ("on", "mixed_float16")])
def test_configure_on_a_cpu(setting, policy):
    train = load_params().train.model_copy(update={"mixed_precision": setting})
    strategy, xla = devices.configure(train, seed=0)
    assert keras.mixed_precision.global_policy().name == policy
    assert strategy is tf.distribute.get_strategy()
    assert xla is False
