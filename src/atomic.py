"""Atomic outputs: write to a temporary name beside the target, then `os.replace` it into place.

A stage killed half-way leaves either the previous output or none, never a torn file that DVC
would then commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces `target`, on error it is removed.

    `suffix` is for writers that insist on an extension (Keras wants `.keras`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o644)  # mkstemp makes it private; outputs are ordinary readable files
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_leftovers(target: Path) -> None:
    """Clean up after a killed `atomic_dir(target)`: put back the previous output when the kill
    came between its two renames, then delete the `.<name>.*.tmp` and `.old` folders."""
    for old in sorted(target.parent.glob(f".{target.name}.*.old")):
        if not target.exists() and (old / target.name).is_dir():
            os.replace(old / target.name, target)
    for pattern in (f".{target.name}.*.tmp", f".{target.name}.*.old"):
        for path in target.parent.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces the directory `target` whole.

    The swap is two renames (a directory cannot replace a non-empty one in one); a kill between
    them leaves the previous output in `.<name>.*.old`, put back the next time this runs.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary readable folders
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".old"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | Path, data: object) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")
