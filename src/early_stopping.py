"""Early stopping for the train stage: Keras' rule on val_accuracy, resumable, no weight restoring.

Keras' `restore_best_weights` puts the best epoch's weights back at the end of training, also when
no stop happened, and then the saved model is not the one the history's last row, `train.json`
and tuning describe. Here the model training ends with is the model every figure describes.
"""

from __future__ import annotations

import keras


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on val_accuracy, resumable, and without restoring the best weights:
    the model training ends with is the one saved and described by every figure.

    Its state (best value and epoch, epochs waited) is rebuilt from `history`, which the checkpoint
    keeps, so a killed and resumed run stops exactly where an uninterrupted one would.
    """

    def __init__(self, patience: int, history: list[dict]):
        super().__init__("val_accuracy", patience=patience, mode="max")
        self.history = history

    def on_train_begin(self, logs=None):
        self.replay()

    def replay(self) -> bool:
        """Set the state from the epochs in `history`; True if they already meant a stop."""
        super().on_train_begin()
        self._set_monitor_op()
        for epoch, row in enumerate(self.history):
            self.wait += 1
            if self._is_improvement(row["val_accuracy"], self.best):
                self.best, self.best_epoch, self.wait = row["val_accuracy"], epoch, 0
            elif self.wait >= self.patience and epoch > 0:
                self.stopped_epoch = epoch
        return self.stopped_epoch > 0
