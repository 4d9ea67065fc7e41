"""Stage `fetch`: download the CIFAR-10 binary archive into data/raw/, verified, atomically.

    python src/fetch.py      # reads `data.source`, `data.md5`, `paths.archive` (dvc.yaml)

`data.source` is an http(s) URL, a `file://` URL or a local path. The bytes go to `<archive>.part`
first; only once their md5 matches `data.md5` are they moved to the final path. An interrupted HTTP
download resumes with a Range request (or restarts when the server answers 200).

Retries: one policy, in this module only. Refused, cut or timed-out connections and 429/5xx
answers are tried again, `ATTEMPTS` (5) times in all, waiting 2, 4, 8 and 16 s between tries
(30 s); each retry prints a line on stderr saying what failed and when the next try comes. Each
try gives up after `TIMEOUT`: 10 s without a connection (per address), 30 s without a byte. The
worst case before the one-line error is therefore 5 x 10 + 30 = 80 s for an unreachable host,
5 x 30 + 30 = 180 s for one that accepts and stays silent, 30 s for refused connections or 5xx
answers. A 404 or any other client error fails at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

import cli
from params import load_params

CHUNK = 1 << 16  # a cut connection loses at most one chunk of progress
TIMEOUT = (10, 30)  # seconds: connect, between bytes
ATTEMPTS = 5  # tries of one download, the first included
BACKOFF = 2.0  # seconds before the second try, doubled before each next one: 2, 4, 8, 16
RETRY_STATUSES = (429, 500, 502, 503, 504)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _local_path(source: str) -> Path | None:
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(source)


class _Retryable(Exception):
    """A failure that another attempt may not meet; the message says what failed."""


def _reason(error: requests.RequestException) -> str:
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {TIMEOUT[0]} s"
    if isinstance(error, requests.ReadTimeout):
        return f"no data for {TIMEOUT[1]} s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection cut mid-body"
    text = str(error).lower()
    for phrase, reason in (("refused", "connection refused"), ("reset", "connection reset"),
                           ("resolve", "host name not resolved"),
                           ("not known", "host name not resolved")):
        if phrase in text:
            return reason
    return type(error).__name__


def _attempt(session: requests.Session, url: str, part: Path) -> None:
    """One GET that fills `part`, resuming what it already holds with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
            status = f"HTTP {response.status_code} {response.reason}"
            if response.status_code == 416:  # nothing left to send: the part is whole
                return
            if response.status_code in RETRY_STATUSES:
                raise _Retryable(status)
            if response.status_code >= 400:
                raise cli.StageError(f"{url}: {status}")
            resumed = response.status_code == 206
            size = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                    total=size or None, initial=have if resumed else 0, unit="B",
                    unit_scale=True, desc=part.name, disable=None) as bar:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as error:
        raise _Retryable(_reason(error)) from None


def _download(url: str, part: Path) -> None:
    """Fill `part` with the body at `url` in at most ATTEMPTS attempts, saying each retry."""
    session = requests.Session()  # requests itself does not retry: this loop is the only layer
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _attempt(session, url, part)
            return
        except _Retryable as error:
            if attempt == ATTEMPTS:
                raise cli.StageError(
                    f"{url}: unreachable, {ATTEMPTS} attempts failed (last: {error})") from None
            wait = BACKOFF * 2 ** (attempt - 1)
            print(f"fetch: attempt {attempt}/{ATTEMPTS} failed ({error}); "
                  f"retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)


def fetch(source: str, md5: str, archive: str | Path) -> Path:
    """Put the archive from `source` at `archive` once its md5 matches; return its path."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.exists() and md5sum(archive) == md5:
        return archive
    part = archive.with_name(archive.name + ".part")
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise cli.StageError(f"{source}: no such file")
        part.unlink(missing_ok=True)
        shutil.copyfile(local, part)
    else:
        try:
            _download(source, part)
        except cli.StageError:
            part.unlink(missing_ok=True)
            raise
    actual = md5sum(part)
    if actual != md5:
        part.unlink(missing_ok=True)
        raise cli.StageError(f"{source}: md5 {actual} does not match data.md5 {md5}")
    os.replace(part, archive)
    return archive


def main() -> None:
    params = load_params()
    path = fetch(params.data.source, params.data.md5, params.paths.archive)
    print(f"fetch: {path} ({path.stat().st_size} bytes, md5 {params.data.md5})")


if __name__ == "__main__":
    cli.run("fetch", main)
