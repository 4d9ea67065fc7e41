"""The fetch stage against a loopback server that misbehaves on purpose."""

from __future__ import annotations

import hashlib

import pytest

import cli
import fetch as fetch_module
from fetch import fetch


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """The retry policy as it is, without its waits."""
    monkeypatch.setattr(fetch_module, "BACKOFF", 0.0)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_lands(server, tiny_archive, tmp_path):
    target = tmp_path / "raw" / "cifar-10-binary.tar.gz"
    fetch(server.url, tiny_archive[1], target)
    assert md5(target) == tiny_archive[1]
    assert not target.with_name(target.name + ".part").exists()


def test_cut_connection_resumes_with_range(server, tiny_archive, tmp_path):
    server.faults.cut_after = 300_000
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target)
    assert md5(target) == tiny_archive[1]
    first, second = server.faults.requests
    assert first == "" and second.startswith("bytes=")
    assert 0 < int(second[6:-1]) <= 300_000  # resumed from what had arrived, not from zero


def test_cut_connection_restarts_when_range_is_ignored(server, tiny_archive, tmp_path):
    server.faults.cut_after = 300_000
    server.faults.ranges = False
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target)
    assert md5(target) == tiny_archive[1]


def test_part_left_by_a_killed_run_is_resumed(server, tiny_archive, tmp_path):
    target = tmp_path / "a.tar.gz"
    target.with_name(target.name + ".part").write_bytes(tiny_archive[0].read_bytes()[:7000])
    fetch(server.url, tiny_archive[1], target)
    assert md5(target) == tiny_archive[1]
    assert server.faults.requests == ["bytes=7000-"]


def test_transient_5xx_are_retried(server, tiny_archive, tmp_path):
    server.faults.errors = [503, 500]
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target)
    assert md5(target) == tiny_archive[1]
    assert len(server.faults.requests) == 3


def test_persistent_5xx_gives_up_after_the_policy_s_attempts(server, tiny_archive, tmp_path,
                                                              capsys):
    server.faults.errors = [503] * 50
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="5 attempts failed .last: HTTP 503"):
        fetch(server.url, tiny_archive[1], target)
    assert len(server.faults.requests) == fetch_module.ATTEMPTS == 5  # one retry layer, no other
    assert capsys.readouterr().err.splitlines() == [
        f"fetch: attempt {n}/5 failed (HTTP 503 Service Unavailable); retrying in 0 s"
        for n in range(1, 5)]
    assert not target.exists()


def test_404_fails_at_once_and_leaves_nothing(server, tiny_archive, tmp_path):
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="HTTP 404") as error:
        fetch(server.url.replace("cifar-10", "missing"), tiny_archive[1], target)
    assert server.url.replace("cifar-10", "missing") in str(error.value)
    assert len(server.faults.requests) == 1
    assert not target.exists() and not target.with_name(target.name + ".part").exists()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="does not match data.md5"):
        fetch(server.url, "0" * 32, target)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_names_the_source_and_each_retry(tmp_path, capsys):
    url = "http://127.0.0.1:9/cifar-10-binary.tar.gz"  # discard port: nothing listens
    with pytest.raises(cli.StageError, match="127.0.0.1:9.*unreachable, 5 attempts failed"):
        fetch(url, "0" * 32, tmp_path / "a.tar.gz")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"fetch: attempt {n}/5 failed (connection refused); retrying in 0 s"
                     for n in range(1, 5)]
    assert list(tmp_path.iterdir()) == []


def test_retry_waits_double_from_the_stated_first_wait(monkeypatch, tmp_path):
    waits = []
    monkeypatch.setattr(fetch_module, "BACKOFF", 2.0)
    monkeypatch.setattr(fetch_module.time, "sleep", waits.append)
    with pytest.raises(cli.StageError):
        fetch("http://127.0.0.1:9/a.tar.gz", "0" * 32, tmp_path / "a.tar.gz")
    assert waits == [2, 4, 8, 16]  # 30 s in all, as the module docstring states


@pytest.mark.parametrize("as_uri", [True, False])
def test_local_source_goes_through_the_same_checks(tiny_archive, tmp_path, as_uri):
    archive, digest = tiny_archive
    source = archive.as_uri() if as_uri else str(archive)
    target = tmp_path / "raw" / "a.tar.gz"
    fetch(source, digest, target)
    assert md5(target) == digest
    with pytest.raises(cli.StageError, match="does not match"):
        fetch(source, "f" * 32, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()
    with pytest.raises(cli.StageError, match="no such file"):
        fetch(str(tmp_path / "nope.tar.gz"), digest, tmp_path / "c.tar.gz")
