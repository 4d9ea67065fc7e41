"""The fetch stage against a loopback server that misbehaves on purpose."""

from __future__ import annotations

import hashlib

import pytest

import cli
from fetch import fetch


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_lands(server, tiny_archive, tmp_path):
    target = tmp_path / "raw" / "cifar-10-binary.tar.gz"
    fetch(server.url, tiny_archive[1], target, backoff=0)
    assert md5(target) == tiny_archive[1]
    assert not target.with_name(target.name + ".part").exists()


def test_cut_connection_resumes_with_range(server, tiny_archive, tmp_path):
    server.faults.cut_after = 300_000
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target, backoff=0)
    assert md5(target) == tiny_archive[1]
    first, second = server.faults.requests
    assert first == "" and second.startswith("bytes=")
    assert 0 < int(second[6:-1]) <= 300_000  # resumed from what had arrived, not from zero


def test_cut_connection_restarts_when_range_is_ignored(server, tiny_archive, tmp_path):
    server.faults.cut_after = 300_000
    server.faults.ranges = False
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target, backoff=0)
    assert md5(target) == tiny_archive[1]


def test_part_left_by_a_killed_run_is_resumed(server, tiny_archive, tmp_path):
    target = tmp_path / "a.tar.gz"
    target.with_name(target.name + ".part").write_bytes(tiny_archive[0].read_bytes()[:7000])
    fetch(server.url, tiny_archive[1], target, backoff=0)
    assert md5(target) == tiny_archive[1]
    assert server.faults.requests == ["bytes=7000-"]


def test_transient_5xx_are_retried(server, tiny_archive, tmp_path):
    server.faults.errors = [503, 500]
    target = tmp_path / "a.tar.gz"
    fetch(server.url, tiny_archive[1], target, backoff=0)
    assert md5(target) == tiny_archive[1]
    assert len(server.faults.requests) == 3


def test_persistent_5xx_gives_up_after_a_bounded_number_of_tries(server, tiny_archive, tmp_path):
    server.faults.errors = [503] * 50
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="HTTP 503"):
        fetch(server.url, tiny_archive[1], target, retries=3, backoff=0)
    assert len(server.faults.requests) == 4
    assert not target.exists()


def test_404_fails_at_once_and_leaves_nothing(server, tiny_archive, tmp_path):
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="HTTP 404") as error:
        fetch(server.url.replace("cifar-10", "missing"), tiny_archive[1], target, backoff=0)
    assert server.url.replace("cifar-10", "missing") in str(error.value)
    assert len(server.faults.requests) == 1
    assert not target.exists() and not target.with_name(target.name + ".part").exists()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    target = tmp_path / "a.tar.gz"
    with pytest.raises(cli.StageError, match="does not match data.md5"):
        fetch(server.url, "0" * 32, target, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_names_the_source(tmp_path):
    url = "http://127.0.0.1:9/cifar-10-binary.tar.gz"  # discard port: nothing listens
    with pytest.raises(cli.StageError, match="127.0.0.1:9.*unreachable"):
        fetch(url, "0" * 32, tmp_path / "a.tar.gz", retries=1, backoff=0)
    assert list(tmp_path.iterdir()) == []


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
