"""Reading the binary archive and splitting it as the seed did; every bad archive is refused."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile

import numpy as np
import pytest

import cifar
from cifar import load_split
from conftest import make_archive
from preprocess import preprocess, split


def test_round_trip_of_the_record_layout():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    parsed = cifar.parse_batch(cifar.encode_batch(images, labels), "x")
    np.testing.assert_array_equal(parsed.images, images)
    np.testing.assert_array_equal(parsed.labels, labels)
    # the first byte of a record is its label, then the red plane
    raw = cifar.encode_batch(images[:1], labels[:1])
    assert raw[0] == labels[0] and raw[1] == images[0, 0, 0, 0] and raw[1025] == images[0, 0, 0, 1]


def test_preprocess_splits_like_validation_split(tiny_archive, tmp_path):
    archive, _ = tiny_archive
    summary = preprocess(archive, tmp_path / "processed", tmp_path / "data.json", val_size=60)
    train, test = cifar.read_archive(archive)
    assert summary["counts"] == {"train": 240, "val": 60, "test": 60}
    np.testing.assert_array_equal(load_split(tmp_path / "processed", "val").images,
                                  train.images[240:])
    np.testing.assert_array_equal(load_split(tmp_path / "processed", "train").labels,
                                  train.labels[:240])
    saved = json.loads((tmp_path / "data.json").read_text())
    assert sum(saved["per_class"]["test"].values()) == 60
    assert len(saved["train_pixel_mean"]) == 3 and all(0 < s < 1 for s in saved["train_pixel_std"])
    assert load_split(tmp_path / "processed", "train").images.dtype == np.uint8


def test_train_limit_keeps_the_first_images(tiny_archive):
    train, test = cifar.read_archive(tiny_archive[0])
    splits = split(train, test, val_size=60, train_limit=100)
    assert (len(splits["train"]), len(splits["val"])) == (100, 60)
    np.testing.assert_array_equal(splits["val"].labels, train.labels[-60:])


def test_val_size_too_large_is_refused(tiny_archive):
    train, test = cifar.read_archive(tiny_archive[0])
    with pytest.raises(cifar.ArchiveError, match="data.val_size 300 leaves no training images"):
        split(train, test, val_size=300)


def _tar_with(tmp_path, member: tarfile.TarInfo, payload: bytes = b"") -> str:
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as out:
        out.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return str(path)


def _member(name: str, kind=tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(("member", "message"), [
    (_member("../evil.bin"), "unsafe member path '../evil.bin'"),
    (_member("/etc/evil.bin"), "unsafe member path '/etc/evil.bin'"),
    (_member("cifar-10-batches-bin/x", tarfile.SYMTYPE, link="/etc/passwd"), "links are not"),
    (_member("cifar-10-batches-bin/y", tarfile.LNKTYPE, link="cifar-10-batches-bin/x"), "links"),
    (_member("cifar-10-batches-bin/fifo", tarfile.FIFOTYPE), "not a regular file"),
])
def test_unsafe_members_are_refused(tmp_path, member, message):
    with pytest.raises(cifar.ArchiveError, match=message):
        cifar.read_archive(_tar_with(tmp_path, member))


def test_truncated_archive_is_refused(tiny_archive, tmp_path):
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(tiny_archive[0].read_bytes()[:5000])
    with pytest.raises(cifar.ArchiveError, match="truncated or corrupted"):
        cifar.read_archive(path)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(cifar.ArchiveError, match="truncated or corrupted"):
        cifar.read_archive(path)


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x00" * (cifar.RECORD_BYTES + 5), "not a whole number of 3073-byte records"),
    (b"", "not a whole number"),
    (bytes([10]) + b"\x00" * (cifar.RECORD_BYTES - 1), "1 label.s. outside 0-9"),
    (pickle.dumps({"data": [1, 2, 3]}, protocol=2), "is a Python pickle"),
])
def test_bad_batches_are_refused(tmp_path, payload, message):
    path = tmp_path / "a.tar.gz"
    make_archive(path, batches={cifar.TRAIN_MEMBERS[2]: payload})
    with pytest.raises(cifar.ArchiveError, match=message) as error:
        cifar.read_archive(path)
    assert cifar.TRAIN_MEMBERS[2] in str(error.value)


def test_missing_member_is_named(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as out:
        out.addfile(_member("cifar-10-batches-bin/data_batch_1.bin"), io.BytesIO(b""))
    with pytest.raises(cifar.ArchiveError, match="missing member.*data_batch_2.bin"):
        cifar.read_archive(path)


def test_batch_of_any_whole_size_is_accepted(tmp_path):
    path = tmp_path / "a.tar.gz"
    make_archive(path, per_batch=3, test=7)
    train, test = cifar.read_archive(path)
    assert (len(train), len(test)) == (15, 7)
