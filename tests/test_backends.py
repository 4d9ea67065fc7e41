"""The pipeline on the JAX backend, end to end, without TensorFlow; params choose the backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from cifar import load_split
from conftest import sh, tool_env
from params import update_yaml


def runs_of(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list")


@pytest.mark.slow
def test_jax_pipeline_runs_without_tensorflow_and_resumes_a_kill_exactly(
        project, no_tensorflow, tmp_path_factory):
    from test_reliability import assert_same_as_uninterrupted, start, wait_for_epoch

    update_yaml(project / "params.yaml", {"train.backend": "jax", "train.epochs": 3,
                                          "augment.flip": True, "augment.crop": 4})
    sh("git", "commit", "-qam", "jax, 3 epochs", cwd=project)
    blocked = sh("python", "-c", "import tensorflow", cwd=project, check=False, **no_tensorflow)
    assert "is blocked" in blocked.stderr  # the blocker works

    sh("dvc", "repro", "preprocess", cwd=project, **no_tensorflow)
    process = start(project, "dvc", "repro", **no_tensorflow)
    wait_for_epoch(project, 1, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = json.loads((project / "checkpoints/train/state.json").read_text())["epochs_done"]
    assert 1 <= done < 3
    resumed = sh("dvc", "repro", cwd=project, **no_tensorflow).stdout
    assert f"resuming after epoch {done}" in resumed

    metrics = json.loads((project / "reports/metrics.json").read_text())
    history = pd.read_csv(project / "reports/history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert metrics["val_accuracy"] == pytest.approx(history["val_accuracy"].iloc[-1], abs=1e-6)
    (run,) = runs_of(project)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.backend"] == "jax"
    assert run.data.tags["keras.backend"].startswith("jax ")
    assert run.data.tags["devices.policy"] == "float32"  # `auto` on a CPU
    # MLflow's Keras 3 flavor names the Keras that trained it, and its backend
    flavor = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model").flavors["keras"]
    assert (flavor["keras_version"], flavor["keras_backend"]) == (keras.__version__, "jax")
    # trained on JAX, loaded here on TensorFlow: predicts on raw uint8 images
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = load_split(project / "data/processed", "test").images[:4]
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-3)

    # an uninterrupted run of the same config ends with exactly the same figures
    assert_same_as_uninterrupted(project, tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize(("params_backend", "environment"), [
    ("jax", "tensorflow"), ("tensorflow", "jax"), ("jax", None)])
def test_params_choose_the_backend_over_the_environment(tmp_path, params_backend, environment):
    (tmp_path / "params.yaml").write_text(f"train:\n  backend: {params_backend}\n")
    env = tool_env(PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    env.pop("KERAS_BACKEND", None)
    if environment:
        env["KERAS_BACKEND"] = environment
    # backend loads Keras without the packages it imports for features the pipeline never uses
    # (TensorFlow's for a JAX run, jax's and scikit-learn's); they stay importable afterwards
    code = ("import sys, backend, keras; print(keras.backend.backend()); "
            "print(*sorted({'tensorflow', 'jax', 'sklearn'} & set(sys.modules)) or ['none']); "
            "import sklearn")
    result = subprocess.run(["python", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True)
    loaded = ["tensorflow"] if params_backend == "tensorflow" else ["jax"]
    assert result.stdout.splitlines() == [params_backend, " ".join(loaded)]
    if environment:
        assert f"KERAS_BACKEND={environment} ignored" in result.stderr


@pytest.mark.parametrize(("deterministic", "flags_before", "flags_after"), [
    (True, None, "--xla_gpu_deterministic_ops=true"),
    (True, "--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"),
    (True, "--xla_gpu_deterministic_ops=true", "--xla_gpu_deterministic_ops=true"),  # once
    (False, None, None)])
def test_deterministic_on_jax_sets_xla_s_deterministic_ops(tmp_path, monkeypatch, deterministic,
                                                           flags_before, flags_after):
    """train.deterministic on JAX: XLA's deterministic GPU kernels, set by `select` (which runs
    before JAX starts; on a CPU, JAX reruns are identical anyway: the jax pipeline test compares
    a resumed and an uninterrupted run bit for bit with deterministic off)."""
    import backend

    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  backend: jax\n  deterministic: {str(deterministic).lower()}\n")
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # select sets it; put back after the test
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    if flags_before:
        monkeypatch.setenv("XLA_FLAGS", flags_before)
    assert backend.select(str(params)) == "jax"
    assert os.environ.get("XLA_FLAGS") == flags_after
