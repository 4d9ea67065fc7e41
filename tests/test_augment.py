"""Host-side augmentation and the numpy input pipeline: resumable, training-only, per param."""

from __future__ import annotations

import numpy as np
import pytest

import dataset
from augment import augment
from cifar import Split
from params import Augment

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 10, 64).astype(np.uint8)
SPLIT = Split(IMAGES, LABELS)
OFF = dataset.NO_AUGMENTATION
EACH = {"flip": True, "crop": 4, "shift": 0.125, "cutout": 8, "mixup": 0.4, "cutmix": 1.0}


def batches(params: Augment, first_epoch: int = 0) -> dataset.TrainBatches:
    return dataset.TrainBatches(SPLIT, 16, seed=7, first_epoch=first_epoch, epochs=3,
                                params=params)


def test_every_batch_is_a_function_of_seed_epoch_and_index():
    params = OFF.model_copy(update=EACH)
    full, resumed = batches(params), batches(params, first_epoch=1)
    assert len(full) == 12 and len(resumed) == 8
    for index in range(8):  # a run resumed after epoch 1 sees the same batches
        for a, b in zip(full[index + 4], resumed[index], strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0][0], full[4][0])  # each epoch its own order


def _seen_by_keras(batches: dataset.TrainBatches) -> list:
    """Every batch of a fit as Keras' epoch iterator (what JAX's trainer reads) hands them out."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    epochs = batches.epochs - batches.first_epoch
    iterator = EpochIterator(batches, steps_per_epoch=batches.steps, shuffle=False)
    seen = []
    for _ in range(epochs):
        for _, _, data in iterator:
            seen.extend(data)
    iterator.data_adapter.on_epoch_end()
    return seen


def test_keras_worker_threads_hand_out_every_epoch_s_batches_in_order():
    """On JAX, Keras' enqueuer threads make the batches; it is stopped and started at every
    epoch, and must go on to the next epoch's batches, not back to the first ones."""
    params = OFF.model_copy(update=EACH)
    for first_epoch in (0, 1):  # a whole fit and a fit resumed after epoch 1
        made = batches(params, first_epoch)
        assert made.workers > 1
        seen = _seen_by_keras(made)
        assert len(seen) == len(made)
        for index, (images, labels) in enumerate(seen):
            expected_images, expected_labels = made[index]
            np.testing.assert_array_equal(images, expected_images)
            np.testing.assert_array_equal(labels, expected_labels)


def test_epoch_order_is_a_permutation_keyed_on_seed_and_epoch():
    order = dataset.epoch_order(64, 7, 2)
    assert sorted(order) == list(range(64))
    np.testing.assert_array_equal(order, dataset.epoch_order(64, 7, 2))
    assert not np.array_equal(order, dataset.epoch_order(64, 8, 2))


@pytest.mark.parametrize("key", sorted(EACH))
def test_each_param_changes_training_batches_only(key):
    params = OFF.model_copy(update={key: EACH[key]})
    plain, augmented = batches(OFF)[0], batches(params)[0]
    assert augmented[0].dtype == np.uint8 and augmented[0].shape == plain[0].shape
    assert not np.array_equal(plain[0], augmented[0])
    np.testing.assert_allclose(augmented[1].sum(axis=1), 1, rtol=1e-6)
    if key not in ("mixup", "cutmix"):
        np.testing.assert_array_equal(plain[1], augmented[1])  # labels untouched
    # evaluation batches never see augmentation
    evaluation = dataset.EvalBatches(SPLIT, 16)
    np.testing.assert_array_equal(evaluation[0][0], IMAGES[:16])


def test_flip_mirrors_or_keeps_each_image():
    flipped, _ = augment(IMAGES, np.eye(10)[LABELS], OFF.model_copy(update={"flip": True}),
                         np.random.default_rng(1))
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, IMAGES, strict=True)]
    kept = [np.array_equal(f, i) for f, i in zip(flipped, IMAGES, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 0 < sum(mirrored) < len(IMAGES)


def test_crop_pads_with_zeros_by_at_most_its_pixels():
    white = np.full((256, 32, 32, 3), 255, np.uint8)
    cropped, _ = augment(white, np.eye(10)[np.zeros(256, int)],
                         OFF.model_copy(update={"crop": 4}), np.random.default_rng(2))
    assert (cropped[:, 4:28, 4:28] == 255).all()  # the centre always stays image
    assert (cropped == 0).any() and (cropped == 0).mean() < 0.3


def test_cutout_zeroes_a_square():
    white = np.full((8, 32, 32, 3), 255, np.uint8)
    cut, _ = augment(white, np.eye(10)[np.zeros(8, int)], OFF.model_copy(update={"cutout": 8}),
                     np.random.default_rng(3))
    zeroed = (cut == 0).all(axis=-1).sum(axis=(1, 2))
    assert ((zeroed > 0) & (zeroed <= 64)).all()


def test_the_model_holds_no_augmentation():
    import keras

    from model import build_model
    from params import load_params

    model = build_model(load_params().model, seed=0)
    assert not [layer for layer in model.layers
                if isinstance(layer, keras.layers.RandomFlip | keras.layers.RandomTranslation)]


# A plain per-image reference: the same random draws in the same order, then each image's pixels
# moved one image (or one pixel) at a time, in the most direct way.

def _reference_translate(images, pixels, mode, rng):
    n, size = len(images), images.shape[1]
    top, left = rng.integers(0, 2 * pixels + 1, n), rng.integers(0, 2 * pixels + 1, n)
    out = []
    for image, y, x in zip(images, top, left, strict=True):
        padded = np.pad(image, ((pixels, pixels), (pixels, pixels), (0, 0)), mode=mode)
        out.append(padded[y:y + size, x:x + size])
    return np.stack(out)


def _reference_box(size, side, rng, n):
    """Per image, the set of (y, x) pixels inside its square (the square may leave the image)."""
    centre_y, centre_x = rng.integers(0, size, (2, n))
    return [{(y, x) for y in range(size) for x in range(size)
             if cy - side // 2 <= y < cy - side // 2 + side
             and cx - side // 2 <= x < cx - side // 2 + side}
            for cy, cx in zip(centre_y, centre_x, strict=True)]


def reference(images, labels, params, rng):
    images, labels = images.copy(), labels.copy()
    n, size = len(images), images.shape[1]
    if params.flip:
        flips = rng.random(n) < 0.5
        images = np.stack([im[:, ::-1] if f else im for im, f in zip(images, flips, strict=True)])
    if params.crop:
        images = _reference_translate(images, params.crop, "constant", rng)
    if params.shift:
        images = _reference_translate(images, int(round(params.shift * size)), "reflect", rng)
    if params.cutout:
        for image, box in zip(images, _reference_box(size, params.cutout, rng, n), strict=True):
            for y, x in box:
                image[y, x] = 0
    mixers = [cut for cut, alpha in ((False, params.mixup), (True, params.cutmix)) if alpha > 0]
    if mixers:
        cut = mixers[rng.integers(len(mixers))]
        partner = rng.permutation(n)
        weight = np.float32(rng.beta(*(2 * [params.cutmix if cut else params.mixup])))
        mixed_images, mixed_labels = images.copy(), labels.copy()
        if cut:
            side = int(round(size * np.sqrt(1.0 - float(weight))))
            for i, box in enumerate(_reference_box(size, side, rng, n)):
                for y, x in box:
                    mixed_images[i, y, x] = images[partner[i], y, x]
                kept = np.float32(1 - len(box) / size**2)
                mixed_labels[i] = kept * labels[i] + (1 - kept) * labels[partner[i]]
        else:
            for i in range(n):
                blend = weight * images[i].astype(np.float32) + (1 - weight) * images[partner[i]]
                mixed_images[i] = np.rint(blend).astype(np.uint8)
                mixed_labels[i] = weight * labels[i] + (1 - weight) * labels[partner[i]]
        images, labels = mixed_images, mixed_labels
    return images, labels


RECIPE_AUGMENT = {"flip": True, "crop": 4, "cutout": 16}


@pytest.mark.parametrize("update", [
    *({key: value} for key, value in EACH.items()), RECIPE_AUGMENT,
    {**RECIPE_AUGMENT, "cutmix": 1.0}, {**RECIPE_AUGMENT, "mixup": 0.2, "cutmix": 1.0},
    {"cutout": 12, "shift": 0.1}], ids=str)
def test_augment_equals_the_per_image_reference_on_the_same_draws(update):
    params = OFF.model_copy(update=update)
    labels = np.eye(10, dtype=np.float32)[LABELS]
    for seed in range(6):
        fast = augment(IMAGES, labels, params, np.random.default_rng(seed))
        slow = reference(IMAGES, labels, params, np.random.default_rng(seed))
        assert fast[0].dtype == np.uint8 and fast[1].dtype == np.float32
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_allclose(fast[1], slow[1], rtol=0, atol=1e-6)


PALETTE = np.linspace(0, 250, 10).astype(np.uint8)  # image i: all pixels PALETTE[i], class i
FLAT = np.broadcast_to(PALETTE[:, None, None, None], (10, 32, 32, 3)).copy()
FLAT_LABELS = np.eye(10, dtype=np.float32)


def test_cutmix_label_weight_is_the_surviving_pixel_share_of_its_image():
    params = OFF.model_copy(update={"cutmix": 1.0})
    checked = 0
    for seed in range(20):
        images, labels = augment(FLAT, FLAT_LABELS, params, np.random.default_rng(seed))
        for i in range(10):
            share = (images[i, ..., 0] == PALETTE[i]).mean()
            assert labels[i, i] == pytest.approx(share, abs=1e-6), (seed, i)
            others = np.delete(np.arange(10), i)
            pasted = [(images[i, ..., 0] == PALETTE[j]).mean() for j in others]
            assert labels[i, others] == pytest.approx(pasted, abs=1e-6)
            checked += 0 < share < 1
    assert checked > 50  # most images had a square pasted, not none or all of it


def test_mixup_label_weight_matches_its_image_blend():
    params = OFF.model_copy(update={"mixup": 0.2})  # weights near 0 or 1: a swap shows
    checked = 0
    for seed in range(20):
        images, labels = augment(FLAT, FLAT_LABELS, params, np.random.default_rng(seed))
        for i in range(10):
            partner = int(np.flatnonzero(labels[i] * (np.arange(10) != i)).max(initial=i)) \
                if labels[i, i] < 1 else i
            if partner == i:
                continue
            own, other = float(PALETTE[i]), float(PALETTE[partner])
            image_weight = (float(images[i, 0, 0, 0]) - other) / (own - other)
            assert (images[i] == images[i, 0, 0, 0]).all()
            assert labels[i, i] == pytest.approx(image_weight, abs=0.5 / abs(own - other) + 1e-6)
            assert labels[i].sum() == pytest.approx(1, abs=1e-6)
            checked += abs(labels[i, i] - 0.5) > 0.1
    assert checked > 50
