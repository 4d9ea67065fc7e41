"""Training progress a person can follow: Keras' progress bars on a terminal, otherwise one plain
line per epoch (a log file or a pipe gets no bars, no carriage returns and no colour codes). The
one policy of the train stage and the tuning trials (fitting.fit applies it by default).

    trial 3 epoch 2/5: loss 1.6931 accuracy 0.4102 val_loss 1.7012 val_accuracy 0.3817
"""

from __future__ import annotations

import sys

import keras


def on_terminal() -> bool:
    return sys.stdout.isatty()


def verbosity() -> int:
    """Keras' `verbose` for fit: bars on a terminal, silence elsewhere (EpochLines prints)."""
    return 1 if on_terminal() else 0


class EpochLines(keras.callbacks.Callback):
    """Print `<label> epoch i/n: metric value ...` after every epoch, flushed at once."""

    def __init__(self, label: str = "", keys: tuple[str, ...] = ()):
        super().__init__()
        self.label = f"{label} " if label else ""
        self.keys = keys

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        keys = self.keys or tuple(logs)
        figures = " ".join(f"{key} {float(logs[key]):.4f}" for key in keys if key in logs)
        total = self.params.get("epochs", "?") if self.params else "?"
        print(f"{self.label}epoch {epoch + 1}/{total}: {figures}", flush=True)


def callbacks(label: str = "") -> list[keras.callbacks.Callback]:
    """What `fit` adds for progress: nothing on a terminal (Keras draws bars), else EpochLines."""
    return [] if on_terminal() else [EpochLines(label)]
