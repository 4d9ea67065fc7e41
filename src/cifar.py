"""The CIFAR-10 binary format, read safely with numpy, and the splits the preprocess stage writes.

The official `cifar-10-binary.tar.gz` holds `cifar-10-batches-bin/data_batch_{1..5}.bin` and
`test_batch.bin`; every record is one label byte then 1024 red, 1024 green and 1024 blue bytes
(row-major 32x32). Members are read from the tar stream into memory: nothing is extracted, nothing
is unpickled, and an archive holding unsafe members (absolute paths, `..`, links, devices) is
refused whole.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cli import StageError, UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
RECORD_BYTES = 1 + 32 * 32 * 3
FOLDER = "cifar-10-batches-bin"
TRAIN_MEMBERS = tuple(f"{FOLDER}/data_batch_{i}.bin" for i in range(1, 6))
TEST_MEMBER = f"{FOLDER}/test_batch.bin"
TRAIN_IMAGES = 50_000  # the official archive's five training batches of 10000
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class ArchiveError(UserError, ValueError):
    """The archive is not a valid CIFAR-10 binary archive; the message names the problem."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 32, 32, 3) uint8
    labels: np.ndarray  # (n,) uint8 in 0..9

    def __len__(self) -> int:
        return len(self.labels)


def parse_batch(payload: bytes, name: str) -> Split:
    """Decode one batch file's bytes; any whole number of records is accepted."""
    if payload[:2] in _PICKLE_MAGIC:
        raise ArchiveError(f"{name}: is a Python pickle, not a binary batch (refusing to load it)")
    if not payload or len(payload) % RECORD_BYTES:
        raise ArchiveError(
            f"{name}: size {len(payload)} is not a whole number of {RECORD_BYTES}-byte records")
    records = np.frombuffer(payload, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].copy()
    if labels.max() >= len(CLASSES):
        bad = int(np.count_nonzero(labels >= len(CLASSES)))
        raise ArchiveError(f"{name}: {bad} label(s) outside 0-9 (max {int(labels.max())})")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"unsafe member path {member.name!r} (absolute or '..')")
    if member.issym() or member.islnk():
        raise ArchiveError(f"unsafe member {member.name!r}: links are not allowed")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"unsafe member {member.name!r}: not a regular file")


def read_archive(path: str | Path) -> tuple[Split, Split]:
    """(train, test): the five training batches of the archive in order, and the test batch."""
    wanted = {*TRAIN_MEMBERS, TEST_MEMBER}
    payloads: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                _check_member(member)
                if member.name in wanted:
                    payloads[member.name] = archive.extractfile(member).read()
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file: run `dvc repro fetch`") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ArchiveError(f"{path}: truncated or corrupted archive ({error})") from None
    missing = sorted(wanted - payloads.keys())
    if missing:
        raise ArchiveError(f"{path}: missing member(s) {', '.join(missing)}")
    batches = [parse_batch(payloads[name], name) for name in TRAIN_MEMBERS]
    train = Split(np.concatenate([b.images for b in batches]),
                  np.concatenate([b.labels for b in batches]))
    return train, parse_batch(payloads[TEST_MEMBER], TEST_MEMBER)


def encode_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The binary records for `images` (n, 32, 32, 3) and `labels`; the inverse of parse_batch."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None], planes], axis=1).astype(np.uint8).tobytes()


def split_path(processed: str | Path, name: str) -> Path:
    """`<processed>/<name>.npz`, a split the preprocess stage wrote (a one-line error without
    it)."""
    path = Path(processed) / f"{name}.npz"
    if not path.is_file():
        raise StageError(f"{path} is missing: run `dvc repro preprocess`")
    return path


def split_size(processed: str | Path, name: str) -> int:
    """How many images a split the preprocess stage wrote holds (only its labels are read)."""
    with np.load(split_path(processed, name), allow_pickle=False) as arrays:
        return len(arrays["labels"])


def load_split(processed: str | Path, name: str) -> Split:
    """One split the preprocess stage wrote (`<processed>/<name>.npz`), never unpickled."""
    with np.load(split_path(processed, name), allow_pickle=False) as arrays:
        return Split(arrays["images"], arrays["labels"])
