"""Fitting the seed's CNN: compile it from the params and train it, from scratch or resumed.

The library the train stage and the tuning trials share (src/train.py and src/tune.py import it;
neither imports the other). `fit` runs `train.epochs` epochs over the numpy input pipeline
(dataset.py) on the devices `devices.configure` chose, fails loudly on a NaN loss, and calls
`on_epoch(model, history)` after every epoch (checkpointing, logging).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras

import cli
import dataset
import devices
import progress
from cifar import Split
from early_stopping import EarlyStopping
from model import build_model
from params import Params

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class FitResult:
    model: keras.Model
    history: list[dict]  # one row per completed epoch, from the first
    stopped_early: bool


class Diverged(cli.StageError):
    """The loss became NaN or infinite: the params' verdict, the same on every rerun."""


class StopOnNaN(keras.callbacks.Callback):
    """Fail loudly: a NaN loss is an error, not a finished run."""

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise Diverged(f"loss became {loss} in epoch {epoch + 1}; nothing was saved")


class EpochLog(keras.callbacks.Callback):
    """Append each epoch's row (with the gap) to `history`, then call `on_epoch(model, history)`.
    """

    def __init__(self, history: list[dict], on_epoch=None):
        super().__init__()
        self.history = history
        self.on_epoch = on_epoch

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(logs[k]) for k in HISTORY_KEYS if k in logs}}
        row["gap"] = row["accuracy"] - row["val_accuracy"]
        self.history.append(row)
        if self.on_epoch:
            self.on_epoch(self.model, self.history)


def compile_model(model: keras.Model, params: Params, steps: int, xla: bool) -> None:
    train = params.train
    rate = train.learning_rate
    if train.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=train.epochs * steps)
    optimizer = keras.optimizers.SGD(learning_rate=rate, momentum=train.momentum,
                                     nesterov=train.nesterov,
                                     weight_decay=train.weight_decay or None)
    # decay the conv and dense kernels only, as L2 does; not biases or batch-norm scales
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=["accuracy"],
        jit_compile=xla,
    )


def fit(params: Params, train_split: Split, val_split: Split,
        callbacks: Sequence[keras.callbacks.Callback] = (), resume: tuple | None = None,
        on_epoch=None, verbose: int | None = None,
        configured: devices.Setup | None = None) -> FitResult:
    """Train from scratch, or from `resume` = (model, history), up to `train.epochs` epochs.

    `on_epoch(model, history)` runs after every epoch (checkpointing, logging). Without
    `verbose`, progress shows as progress.py says (bars on a terminal, else a line per epoch).
    `configured` is `devices.configure`'s setup when the caller made it: a resumed model must have
    been loaded in its scope, or it trains on one replica.
    """
    setup = configured or devices.configure(params.train, params.seed)
    steps = dataset.steps_per_epoch(len(train_split), params.train.batch_size)
    history = list(resume[1]) if resume else []
    with setup.scope():
        if resume:
            model = resume[0]
        else:
            model = build_model(params.model, params.seed)
            compile_model(model, params, steps, setup.xla)
    patience = params.train.early_stopping_patience
    stop = [EarlyStopping(patience, history)] if patience else []
    if stop and stop[0].replay():  # killed after it stopped, before the checkpoint was cleared
        return FitResult(model, history, stopped_early=True)
    if verbose is None:
        verbose, callbacks = progress.verbosity(), [*callbacks, *progress.callbacks()]
    model.fit(
        dataset.train_dataset(train_split, params.train.batch_size, params.seed, len(history),
                              params.train.epochs, params.augment),
        validation_data=dataset.eval_dataset(val_split, params.train.batch_size),
        epochs=params.train.epochs, initial_epoch=len(history), steps_per_epoch=steps,
        shuffle=False,  # the dataset is already shuffled, per epoch, resumably
        callbacks=[StopOnNaN(), EpochLog(history, on_epoch), *stop, *callbacks],
        verbose=verbose)
    return FitResult(model, history, stopped_early=bool(stop) and stop[0].stopped_epoch > 0)
