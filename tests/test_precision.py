"""Precision: the policy in force keys the checkpoint, and a run resumed under `mixed_bfloat16`
(`train.mixed_precision: on` on a CPU) trains exactly as an uninterrupted one."""

from __future__ import annotations

import keras
import pytest

import devices
from checkpoint import Checkpoint
from conftest import ROOT, TINY
from fitting import fit
from params import parse_params, read_yaml, with_overrides
from test_reliability import _blobs
from train import run_fingerprint

PARAMS = parse_params(with_overrides(read_yaml(ROOT / "params.yaml"), TINY | {
    "train.epochs": 3, "train.deterministic": True, "train.batch_size": 32, "model.dropout": 0.25,
    "augment.flip": True, "augment.crop": 4, "augment.cutout": 8}))


class Abort(Exception):
    """Stands for a kill after a checkpoint."""


@pytest.mark.usefixtures("restore_policy")
def test_the_policy_in_force_is_part_of_the_fingerprint(fake_cpu, tmp_path, monkeypatch):
    data = tmp_path / "train.npz"
    data.write_bytes(b"images")
    fake_cpu("avx512_bf16")
    cpu = devices.configure(PARAMS.train, PARAMS.seed)
    monkeypatch.setattr(devices, "gpus", lambda: ["/device:GPU:0"])  # a machine with a GPU
    gpu = devices.configure(PARAMS.train, PARAMS.seed)
    assert (cpu.policy, gpu.policy) == ("float32", "mixed_float16")
    # the same params.yaml (mixed_precision: auto) on two machines: not the same training
    assert run_fingerprint(PARAMS, cpu, [data]) != run_fingerprint(PARAMS, gpu, [data])
    assert run_fingerprint(PARAMS, cpu, [data]) == run_fingerprint(PARAMS, cpu, [data])


@pytest.mark.usefixtures("restore_policy")
def test_a_resume_under_bf16_is_exact(fake_cpu, tmp_path):
    fake_cpu("avx512_bf16")
    params = PARAMS.model_copy(update={"train": PARAMS.train.model_copy(
        update={"mixed_precision": "on"})})
    train, val = _blobs(96, 10, seed=0), _blobs(32, 10, seed=1)
    setup = devices.configure(params.train, params.seed)
    assert setup.policy == "mixed_bfloat16"
    full = fit(params, train, val, verbose=0, configured=setup)
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert full.model.get_layer("conv1").compute_dtype == "bfloat16"
    assert full.model.get_layer("probs").compute_dtype == "float32"  # softmax and loss

    checkpoint = Checkpoint(tmp_path / "ckpt", "bf16")

    def killed_after_first_epoch(model, history):
        checkpoint.save(model, len(history), "run", history)
        raise Abort

    with pytest.raises(Abort):
        fit(params, train, val, verbose=0, on_epoch=killed_after_first_epoch,
            configured=devices.configure(params.train, params.seed))
    again = devices.configure(params.train, params.seed)
    with again.scope():
        model, state = checkpoint.load()
    assert state.epochs_done == 1
    resumed = fit(params, train, val, verbose=0, resume=(model, state.history), configured=again)
    assert resumed.history == full.history  # every loss and accuracy, to the last bit
