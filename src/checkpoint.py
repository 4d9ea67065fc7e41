"""Resume state of the train stage: a crash or SIGKILL loses at most the epoch in progress.

After every epoch the directory gets a weights file `state-<sha256 prefix>.keras` (weights and
optimizer state) and then `state.json`, which names that file and holds its sha256, the completed
epochs, the MLflow run id, the history so far (from which early stopping rebuilds its state), a
fingerprint, and the random-generator states of dropout and augmentation layers (Keras does not
save them; restored, a resumed run draws the same masks as an uninterrupted one).

The rename of `state.json` is the one commit point: until it happens the previous `state.json` and
the weights it names are untouched, so a kill at any moment leaves the previous or the new
checkpoint. Files a killed save left behind are removed by the next save.

A checkpoint is used only when its fingerprint matches: the params, the data, the source of every
project module the train stage imported and the resolved device settings (dtype policy, XLA,
replicas, Keras backend). Otherwise, or when torn, it is ignored and `ignored` says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

import atomic

SOURCE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class State:
    epochs_done: int
    run_id: str
    history: list[dict]
    fingerprint: str
    rng: list


def _rng_variables(model: keras.Model) -> list:
    return [v for v in model.variables if v.name == "seed_generator_state"]


def fingerprint(*parts: object, files: tuple[Path, ...] = ()) -> str:
    """A digest of JSON-able `parts` and the contents of `files`."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(_sha256(path).encode())
    return digest.hexdigest()


def code_files() -> tuple[Path, ...]:
    """The project modules loaded in this process: the code that computes what is trained."""
    loaded = {Path(module.__file__).resolve() for module in list(sys.modules.values())
              if getattr(module, "__file__", None)}
    return tuple(sorted(path for path in loaded if path.parent == SOURCE_DIR))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Checkpoint:
    def __init__(self, directory: str | Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.state_path = self.directory / "state.json"
        self.ignored: str | None = None  # why `load` found no usable checkpoint, when one existed

    def load(self) -> tuple[keras.Model, State] | None:
        """The saved model and state, or None when absent, torn or from other params/data/code."""
        self.ignored = None
        if not self.state_path.exists():
            return None
        try:
            raw = json.loads(self.state_path.read_text())
            weights, sha = self.directory / raw.pop("weights"), raw.pop("sha256")
            state = State(**raw)
            if _sha256(weights) != sha:
                raise ValueError("weights do not match their hash")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.ignored = "torn or unreadable"
            return None
        if state.fingerprint != self.fingerprint:
            self.ignored = "params, data, code or device settings changed"
            return None
        model = keras.models.load_model(weights)
        for variable, value in zip(_rng_variables(model), state.rng, strict=True):
            variable.assign(value)
        return model, state

    def save(self, model: keras.Model, epochs_done: int, run_id: str, history: list[dict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".state.", suffix=".keras")
        os.close(fd)
        try:
            model.save(tmp)
            sha = _sha256(Path(tmp))
            weights = self.directory / f"state-{sha[:16]}.keras"
            os.replace(tmp, weights)  # a new name: the committed checkpoint is not touched
        finally:
            Path(tmp).unlink(missing_ok=True)
        atomic.write_json(self.state_path, {  # the commit
            "epochs_done": epochs_done, "run_id": run_id, "history": history,
            "fingerprint": self.fingerprint, "weights": weights.name, "sha256": sha,
            "rng": [v.numpy().tolist() for v in _rng_variables(model)]})
        self._remove_all_but(weights.name)

    def clear(self) -> None:
        self.state_path.unlink(missing_ok=True)
        self._remove_all_but()

    def _remove_all_but(self, *keep: str) -> None:
        """Delete weights no state names and the temporary files of killed saves."""
        for path in self.directory.glob("*"):
            ours = path.name.startswith((".state.", "state-"))
            if ours and path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)
