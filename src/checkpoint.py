"""Resume state of the train stage: a crash or SIGKILL loses at most the epoch in progress.

After every epoch the directory gets `state.keras` (weights and optimizer state) and `state.json`
(completed epochs, MLflow run id, history so far, a fingerprint of the params and data, and the
sha256 of `state.keras`, and the random-generator states of dropout and augmentation layers, which
Keras does not save, so that a resumed run draws the same masks as an uninterrupted one). Both are
written atomically, the JSON last; a pair whose hash does not
match (torn between the two renames) or whose fingerprint differs is ignored and training starts
over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import keras

import atomic


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
        self.model_path = self.directory / "state.keras"
        self.state_path = self.directory / "state.json"

    def load(self) -> tuple[keras.Model, State] | None:
        """The saved model and state, or None when absent, torn or from other params/data."""
        try:
            raw = json.loads(self.state_path.read_text())
            sha = raw.pop("sha256")
            state = State(**raw)
            if state.fingerprint != self.fingerprint or _sha256(self.model_path) != sha:
                return None
        except (OSError, ValueError, TypeError, KeyError):
            return None
        model = keras.models.load_model(self.model_path)
        for variable, value in zip(_rng_variables(model), state.rng, strict=True):
            variable.assign(value)
        return model, state

    def save(self, model: keras.Model, epochs_done: int, run_id: str, history: list[dict]) -> None:
        with atomic.atomic_path(self.model_path, suffix=".keras") as tmp:
            model.save(tmp)
            sha = _sha256(tmp)
        atomic.write_json(self.state_path, {
            "epochs_done": epochs_done, "run_id": run_id, "history": history,
            "fingerprint": self.fingerprint, "sha256": sha,
            "rng": [v.numpy().tolist() for v in _rng_variables(model)]})

    def clear(self) -> None:
        self.state_path.unlink(missing_ok=True)
        self.model_path.unlink(missing_ok=True)
