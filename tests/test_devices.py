"""Precision, compilation and data-parallel choices of src/devices.py, per backend.

The pure choices are tested for any GPU count and both backends; the checks of the real devices
expect the CPU-only machine the suite runs on, and are skipped where a GPU is present.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import devices
from params import load_params

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
cpu_only = pytest.mark.skipif(HAS_GPU, reason="a GPU is present")


@pytest.mark.parametrize(("setting", "gpu_count", "backend", "policy"), [
    ("auto", 0, "tensorflow", "float32"),
    ("auto", 0, "jax", "float32"),
    ("auto", 1, "tensorflow", "mixed_float16"),
    ("auto", 1, "jax", "mixed_bfloat16"),
    ("auto", 2, "jax", "mixed_bfloat16"),
    ("on", 1, "tensorflow", "mixed_float16"),
    ("on", 0, "tensorflow", "mixed_bfloat16"),  # a CPU's mixed type is bfloat16, on both backends
    ("on", 0, "jax", "mixed_bfloat16"),
    ("off", 1, "tensorflow", "float32"),
    ("off", 4, "jax", "float32"),
])
def test_precision_policy(setting, gpu_count, backend, policy):
    assert devices.precision_policy(setting, gpu_count, backend) == policy


@pytest.mark.parametrize(("kind", "native"), [
    ("avx2", False), ("avx512_bf16", True), ("amx", True), ("arm", False)])
def test_native_bf16_read_from_the_processor_flags(fake_cpu, kind, native):
    fake_cpu(kind)
    assert devices.native_bf16() is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "missing")
    assert devices.cpu_flags() == frozenset() and not devices.native_bf16()


@pytest.mark.parametrize(("setting", "gpu_count", "split"), [
    ("auto", 0, False),
    ("auto", 1, False),
    ("auto", 2, True),
    ("auto", 8, True),
    ("none", 2, False),           # an explicit setting wins over the device count
    ("data_parallel", 0, True),
    ("data_parallel", 1, True),
])
def test_data_parallel_choice(setting, gpu_count, split):
    assert devices.parallel(setting, gpu_count) is split


@pytest.mark.parametrize(("gpu_count", "backend", "xla"), [
    (0, "tensorflow", False), (1, "tensorflow", True), (2, "tensorflow", True),
    (0, "jax", True), (1, "jax", True)])
def test_xla_on_tensorflow_gpus_and_always_on_jax(gpu_count, backend, xla):
    assert devices.use_xla(gpu_count, backend) is xla


@cpu_only
def test_no_gpus_on_a_cpu_machine():
    assert devices.gpus() == []


@cpu_only
@pytest.mark.usefixtures("restore_policy")
@pytest.mark.parametrize(("cpu", "setting", "policy", "emulated"), [
    ("avx2", "auto", "float32", False),
    ("avx512_bf16", "auto", "float32", False),  # bfloat16 costs accuracy: only when asked for
    ("avx512_bf16", "on", "mixed_bfloat16", False),
    ("amx", "on", "mixed_bfloat16", False),
    ("avx2", "on", "mixed_bfloat16", True),     # asked for where it is emulated: said so
    ("avx512_bf16", "off", "float32", False)])
def test_configure_on_a_cpu(fake_cpu, capsys, cpu, setting, policy, emulated):
    fake_cpu(cpu)
    devices._say_emulated.cache_clear()
    train = load_params().train.model_copy(update={"mixed_precision": setting})
    setup = devices.configure(train, seed=0)
    assert keras.mixed_precision.global_policy().name == policy
    assert (setup.policy, setup.xla, setup.replicas) == (policy, False, 1)
    with setup.scope():
        assert tf.distribute.get_strategy().num_replicas_in_sync == 1
    said = capsys.readouterr().err
    assert ("bfloat16 is emulated" in said) is emulated
    if emulated:
        assert said.startswith("train.mixed_precision: on: ") and said.count("\n") == 1
        devices.configure(train, seed=0)  # the next trial of a study: said once per process
        assert capsys.readouterr().err == ""


@cpu_only
@pytest.mark.usefixtures("restore_policy")
def test_data_parallel_without_gpus_spans_the_cpus():
    train = load_params().train.model_copy(update={"distribute": "data_parallel"})
    setup = devices.configure(train, seed=0)
    with setup.scope():
        strategy = tf.distribute.get_strategy()
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert setup.replicas == strategy.num_replicas_in_sync == \
        len(tf.config.list_logical_devices("CPU"))
