"""Training-time augmentation of uint8 image batches, in numpy on the host.

Every transform is vectorised over the batch and draws from the generator it is given, which the
input pipeline keys on (seed, epoch, batch): a resumed run augments exactly like an uninterrupted
one, on every backend (in-model random layers cost minutes per epoch on JAX). The saved model holds
no augmentation, so inference is unchanged by any of these settings.

- flip: horizontal flip of half the images
- crop: the standard CIFAR pad-and-crop: zero-pad `crop` pixels per side, cut a random 32x32 window
- shift: random translation up to `shift` of the side, filled by reflection
- cutout: a random `cutout`-pixel square of each image set to zero (may overlap the border)
- mixup / cutmix: blend each image (and its one-hot label) with another image of the batch, with a
  weight drawn from Beta(alpha, alpha); with both on, each batch uses one of them at random
"""

from __future__ import annotations

import numpy as np

from params import Augment


def _translate(images: np.ndarray, pixels: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by up to `pixels` in x and y; the uncovered border padded with `mode`."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode=mode)
    top = rng.integers(0, 2 * pixels + 1, n)
    left = rng.integers(0, 2 * pixels + 1, n)
    rows = top[:, None, None] + np.arange(height)[None, :, None]
    cols = left[:, None, None] + np.arange(width)[None, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def _box_masks(n: int, size: int, side: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) masks of squares of `side` pixels centred uniformly in the image."""
    centre_y, centre_x = rng.integers(0, size, (2, n))
    low_y, low_x = centre_y - side // 2, centre_x - side // 2
    axis = np.arange(size)
    in_y = (axis[None, :] >= low_y[:, None]) & (axis[None, :] < (low_y + side)[:, None])
    in_x = (axis[None, :] >= low_x[:, None]) & (axis[None, :] < (low_x + side)[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


def _mix(images, labels, alpha: float, cut: bool, rng: np.random.Generator):
    n, size = len(images), images.shape[1]
    partner = rng.permutation(n)
    weight = rng.beta(alpha, alpha)
    if cut:
        side = np.full(n, int(round(size * np.sqrt(1.0 - weight))))
        mask = _box_masks(n, size, side, rng)
        images = np.where(mask[..., None], images[partner], images)
        kept = 1.0 - mask.mean(axis=(1, 2), dtype=np.float32)[:, None]
        return images, kept * labels + (1.0 - kept) * labels[partner]
    blended = weight * images.astype(np.float32) + (1.0 - weight) * images[partner]
    mixed = np.float32(weight) * labels + np.float32(1.0 - weight) * labels[partner]
    return np.rint(blended).astype(np.uint8), mixed


def augment(images: np.ndarray, labels: np.ndarray, params: Augment, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies of a batch: uint8 images (n, 32, 32, 3), float32 one-hot labels (n, 10)."""
    if params.flip:
        flipped = rng.random(len(images)) < 0.5
        images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    if params.crop:
        images = _translate(images, params.crop, "constant", rng)
    if params.shift:
        pixels = int(round(params.shift * images.shape[2]))
        if pixels:
            images = _translate(images, pixels, "reflect", rng)
    if params.cutout:
        mask = _box_masks(len(images), images.shape[1], np.full(len(images), params.cutout), rng)
        images = np.where(mask[..., None], np.uint8(0), images)
    mixers = [cut for cut, alpha in ((False, params.mixup), (True, params.cutmix)) if alpha > 0]
    if mixers:
        cut = mixers[rng.integers(len(mixers))]
        images, labels = _mix(images, labels, params.cutmix if cut else params.mixup, cut, rng)
    return images, labels
