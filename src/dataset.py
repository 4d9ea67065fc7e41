"""Input pipelines over the uint8 arrays written by `preprocess`, for every Keras backend.

Batches are made in numpy: `TrainBatches` item `i` is a pure function of `(seed, i)`. The order
of epoch `e` is a permutation keyed on `(seed, e)` and a batch's augmentation draws from a
generator keyed on `(seed, e, batch)`, so a run resumed at epoch `k` sees exactly the batches an
uninterrupted run would. All remaining epochs form one sequence, consumed with `steps_per_epoch`,
so Keras keeps a single iterator for the whole fit.

On JAX the batches go to Keras as a `keras.utils.PyDataset` whose worker threads (Keras' ordered
enqueuer) make them ahead of the step. `TrainBatches` tells Keras it has no end (`num_batches`
is None): Keras stops its enqueuer at every epoch's end and, for a dataset with an end, starts
the next epoch back at index 0, where an endless one continues at the next index. TensorFlow is
never imported.
On TensorFlow they are wrapped in a `tf.data` pipeline whose
prefetch thread makes them while the model trains, with autotuning off: in TensorFlow 2.21,
dropping an iterator (Keras does so for the validation data every epoch) waits for the autotuning
thread's back-off, which stalled training for tens of seconds per epoch on a 2-core machine.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np

from augment import augment
from cifar import Split
from model import NUM_CLASSES
from params import Augment

PREFETCH_BATCHES = 8
PREFETCH_WORKERS = 2  # JAX: threads making batches while the step runs
NO_AUGMENTATION = Augment(flip=False, crop=0, shift=0.0, cutout=0, mixup=0.0, cutmix=0.0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch `epoch`: a permutation keyed on (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


class TrainBatches(keras.utils.PyDataset):
    """Shuffled, augmented one-hot batches of epochs `first_epoch` .. `epochs - 1` in a row."""

    def __init__(self, split: Split, batch_size: int, seed: int, first_epoch: int, epochs: int,
                 params: Augment = NO_AUGMENTATION):
        # the TensorFlow path indexes the dataset itself (tf.data prefetches) and ignores these
        super().__init__(workers=PREFETCH_WORKERS, use_multiprocessing=False,
                         max_queue_size=PREFETCH_BATCHES)
        self.images, self.labels = split.images, _one_hot(split.labels)
        self.batch_size, self.seed, self.params = batch_size, seed, params
        self.first_epoch, self.steps = first_epoch, steps_per_epoch(len(split), batch_size)
        self.epochs = epochs

    def __len__(self) -> int:
        return self.steps * (self.epochs - self.first_epoch)

    @property
    def num_batches(self) -> None:
        """None (endless) for Keras: its enqueuer then keeps one stream of indices over all
        epochs, read with `steps_per_epoch`, instead of restarting each epoch at index 0 (the
        workers may make a few batches past the last epoch; nothing reads them)."""
        return None

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, batch = divmod(index, self.steps)
        epoch += self.first_epoch
        order = epoch_order(len(self.images), self.seed, epoch)
        chosen = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, batch])
        return augment(self.images[chosen], self.labels[chosen], self.params, rng)


class EvalBatches(keras.utils.PyDataset):
    """The split in order, in one-hot batches, for evaluation."""

    def __init__(self, split: Split, batch_size: int):
        super().__init__()
        self.images, self.labels = split.images, _one_hot(split.labels)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return steps_per_epoch(len(self.images), self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.images[window], self.labels[window]


def _as_tf_data(batches: keras.utils.PyDataset):
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    shape = batches[0][0].shape[1:]
    signature = (tf.TensorSpec((None, *shape), tf.uint8),
                 tf.TensorSpec((None, NUM_CLASSES), tf.float32))
    return (tf.data.Dataset.from_generator(
                lambda: (batches[i] for i in range(len(batches))), output_signature=signature)
            .apply(tf.data.experimental.assert_cardinality(len(batches)))
            .prefetch(PREFETCH_BATCHES)
            .with_options(options))


def _for_backend(batches: keras.utils.PyDataset):
    return _as_tf_data(batches) if keras.backend.backend() == "tensorflow" else batches


def train_dataset(split: Split, batch_size: int, seed: int, first_epoch: int, epochs: int,
                  params: Augment = NO_AUGMENTATION):
    return _for_backend(TrainBatches(split, batch_size, seed, first_epoch, epochs, params))


def eval_dataset(split: Split, batch_size: int):
    return _for_backend(EvalBatches(split, batch_size))
