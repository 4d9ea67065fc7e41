"""tf.data input pipelines over the uint8 arrays written by `preprocess`.

Images stay uint8 until the model scales them (a quarter of the memory of float32). The training
order of epoch `e` is a stateless permutation keyed on `(seed, e)`, so a run resumed at epoch `k`
sees exactly the batches an uninterrupted run would. All epochs come from one dataset, consumed
with `steps_per_epoch`, so Keras keeps a single iterator for the whole fit.

tf.data autotuning is off: in TensorFlow 2.21, dropping an iterator (Keras does so for the
validation data every epoch) waits for the autotuning thread to finish its back-off, which
stalled training for tens of seconds per epoch on a 2-core machine. Fixed parallelism and
prefetching do as well here without that cost.
"""

from __future__ import annotations

import math
import os

import tensorflow as tf

from cifar import Split
from model import NUM_CLASSES

PARALLEL_CALLS = max(1, min(8, os.cpu_count() or 1))
PREFETCH_BATCHES = 4


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return options


def _gather(split: Split):
    images = tf.constant(split.images)
    labels = tf.one_hot(tf.constant(split.labels, dtype=tf.int32), NUM_CLASSES)

    def take(indices):
        return tf.gather(images, indices), tf.gather(labels, indices)

    return take


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train_dataset(split: Split, batch_size: int, seed: int, first_epoch: int,
                  epochs: int) -> tf.data.Dataset:
    """Shuffled one-hot batches for epochs `first_epoch` .. `epochs - 1`, back to back."""
    n = len(split)

    def epoch_order(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    return (tf.data.Dataset.range(first_epoch, epochs)
            .flat_map(epoch_order)
            .map(_gather(split), num_parallel_calls=PARALLEL_CALLS)
            .prefetch(PREFETCH_BATCHES)
            .with_options(_options()))


def eval_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """The split in order, in one-hot batches, for evaluation."""
    return (tf.data.Dataset.range(len(split))
            .batch(batch_size)
            .map(_gather(split), num_parallel_calls=PARALLEL_CALLS)
            .prefetch(PREFETCH_BATCHES)
            .with_options(_options()))
