"""The checkpoint commits in one rename, cleans up after killed saves, and resumes early stopping.
"""

from __future__ import annotations

import os
import types

import keras
import pytest

import atomic
import checkpoint as checkpoint_module
from checkpoint import Checkpoint
from early_stopping import EarlyStopping


class Crash(Exception):
    """Stands for a kill at one point of a save."""


def _tiny_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _save(directory, epochs_done):
    Checkpoint(directory, "fp").save(_tiny_model(), epochs_done, "run", [{"epoch": epochs_done}])


def test_a_crash_at_any_point_of_a_save_leaves_the_previous_or_the_new_checkpoint(
        tmp_path, monkeypatch):
    real_replace = os.replace
    crash_at, outcomes = 1, []
    while True:
        directory = tmp_path / f"crash-{crash_at}"
        _save(directory, 3)
        calls = []

        def replace(source, target, calls=calls, crash_at=crash_at):
            calls.append(target)
            if len(calls) == crash_at:
                raise Crash(f"killed before renaming to {target}")
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", replace)
        try:
            _save(directory, 4)
        except Crash:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        loaded = Checkpoint(directory, "fp").load()
        assert loaded is not None, f"no checkpoint after a crash at rename {crash_at}"
        outcomes.append(loaded[1].epochs_done)
        if len(calls) < crash_at:  # this save got past every rename: all points were tried
            break
        crash_at += 1
    assert outcomes[0] == 3 and outcomes[-1] == 4 and set(outcomes) == {3, 4}


def test_a_crash_while_cleaning_up_after_the_commit_keeps_the_new_checkpoint(
        tmp_path, monkeypatch):
    _save(tmp_path, 3)

    def crash(self, *keep):
        raise Crash("killed after the commit")

    monkeypatch.setattr(Checkpoint, "_remove_all_but", crash)
    with pytest.raises(Crash):
        _save(tmp_path, 4)
    assert Checkpoint(tmp_path, "fp").load()[1].epochs_done == 4


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    _save(tmp_path, 3)
    # what SIGKILLs at various points leave: unrenamed temporary files, unreferenced weights
    for name in (".state.abc123.keras", ".state.json.xyz.tmp", "state-0123456789abcdef.keras"):
        (tmp_path / name).write_bytes(b"partial")
    _save(tmp_path, 4)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == "state.json" and files[0].startswith("state-")
    assert Checkpoint(tmp_path, "fp").load()[1].epochs_done == 4
    Checkpoint(tmp_path, "fp").clear()
    assert list(tmp_path.iterdir()) == []


def test_torn_or_foreign_checkpoint_is_ignored_and_says_why(tmp_path):
    _save(tmp_path, 3)
    assert Checkpoint(tmp_path, "fp").load()[1].epochs_done == 3
    other = Checkpoint(tmp_path, "other params")
    assert other.load() is None
    assert other.ignored == "params, data, code or device settings changed"
    (weights,) = tmp_path.glob("state-*.keras")
    weights.write_bytes(weights.read_bytes()[:100])  # weights that do not match state.json
    torn = Checkpoint(tmp_path, "fp")
    assert torn.load() is None and torn.ignored == "torn or unreadable"
    (tmp_path / "state.json").write_text("{not json")
    assert torn.load() is None and torn.ignored == "torn or unreadable"
    absent = Checkpoint(tmp_path / "none", "fp")
    assert absent.load() is None and absent.ignored is None


def test_the_fingerprint_covers_the_train_stage_s_code():
    import train  # noqa: F401  (what the stage's process has loaded when it fingerprints)

    names = {path.name for path in checkpoint_module.code_files()}
    assert {"train.py", "model.py", "checkpoint.py", "params.py"} <= names


def test_atomic_dir_puts_back_a_previous_output_and_removes_leftovers(tmp_path):
    target = tmp_path / "out"
    # killed between the two renames: the previous output sits in .old, a new one in .tmp
    (tmp_path / ".out.1.old" / "out").mkdir(parents=True)
    (tmp_path / ".out.1.old" / "out" / "a").write_text("previous")
    (tmp_path / ".out.2.tmp").mkdir()
    with pytest.raises(Crash), atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("half")
        raise Crash("killed while writing")
    assert (target / "a").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / ".out.3.tmp").mkdir()
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _fed(stopper, values, first_epoch=0):
    stopper.set_model(types.SimpleNamespace(stop_training=False))
    for epoch, value in enumerate(values, start=first_epoch):
        stopper.history.append({"val_accuracy": value})
        stopper.on_epoch_end(epoch, {"val_accuracy": value})
        if stopper.model.stop_training:
            break
    return stopper


def test_early_stopping_resumes_with_its_best_value_and_wait():
    values = [0.5, 0.6, 0.55, 0.55, 0.58, 0.59, 0.7]
    whole = EarlyStopping(3, [])
    whole.on_train_begin()
    _fed(whole, values)
    assert (whole.stopped_epoch, whole.best, whole.best_epoch) == (4, 0.6, 1)

    # killed after epoch 3; the checkpoint's history is what a resumed run starts from
    resumed = EarlyStopping(3, [{"val_accuracy": v} for v in values[:3]])
    resumed.on_train_begin()
    assert (resumed.best, resumed.best_epoch, resumed.wait) == (0.6, 1, 1)
    _fed(resumed, values[3:], first_epoch=3)
    assert (resumed.stopped_epoch, resumed.wait) == (whole.stopped_epoch, whole.wait)

    # killed after it stopped, before the checkpoint was cleared: nothing more to train
    assert EarlyStopping(3, [{"val_accuracy": v} for v in values[:5]]).replay()
    assert not EarlyStopping(3, [{"val_accuracy": v} for v in values[:4]]).replay()
