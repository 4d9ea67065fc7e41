"""Stage `fetch`: download the CIFAR-10 binary archive into data/raw/, verified, atomically.

    python src/fetch.py      # reads `data.source`, `data.md5`, `paths.archive` from params.yaml

`data.source` is an http(s) URL, a `file://` URL or a local path. The bytes go to `<archive>.part`
first; only once their md5 matches `data.md5` are they moved to the final path. An interrupted HTTP
download resumes with a Range request (or restarts when the server answers 200); connection errors,
timeouts and 5xx answers are retried with exponential backoff, a bounded number of times; a 404 or
any other client error fails at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

import cli
from params import load_params

CHUNK = 1 << 16  # a cut connection loses at most one chunk of progress
TIMEOUT = (10, 30)  # seconds: connect, between bytes


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


def _session(retries: int, backoff: float) -> requests.Session:
    # urllib3 retries what fails before the body starts: connection errors and 5xx/429 answers.
    retry = Retry(total=retries, backoff_factor=backoff,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET",),
                  raise_on_status=False, respect_retry_after_header=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _download(url: str, part: Path, retries: int, backoff: float) -> None:
    """Fill `part` with the body at `url`, resuming after a cut body (bounded by `retries`)."""
    session = _session(retries, backoff)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
                if response.status_code == 416:  # nothing left to send: the part is whole
                    return
                if response.status_code >= 400:
                    raise cli.StageError(f"{url}: HTTP {response.status_code} {response.reason}")
                resumed = response.status_code == 206
                mode = "ab" if resumed else "wb"
                size = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
                with open(part, mode) as out, tqdm(
                    total=size or None, initial=have if resumed else 0, unit="B",
                    unit_scale=True, desc=part.name, disable=None) as bar:
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            return
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            if attempt == retries:
                reason = type(error).__name__
                raise cli.StageError(
                    f"{url}: unreachable after {retries + 1} tries ({reason})") from None
            time.sleep(backoff * 2**attempt)


def fetch(source: str, md5: str, archive: str | Path, retries: int = 5,
          backoff: float = 1.0) -> Path:
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
            _download(source, part, retries, backoff)
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
