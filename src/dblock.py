"""A lock held across processes (and machines) by everyone who uses the same database.

Optuna and MLflow create their tables on first use, and two processes doing so at once collide
("type studydirection already exists", "duplicate column name"). Every first-time setup, and
every check-then-act on shared state (is the study's budget taken? does the parent run exist?),
runs under `DatabaseLock(url)`: a PostgreSQL advisory lock taken on a connection to the same
database, or a file lock next to a SQLite file. An MLflow server (http, https) or a file store
locks nothing: the server runs its migrations once, alone. Any other database URL (mysql://,
mssql://, ...) is refused with a one-line error: without the lock, the one-study, one-parent-run
and exact-budget guarantees would silently not hold. A database that does not answer is a
one-line error naming its URL (without the password).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import filelock
import sqlalchemy
from sqlalchemy.pool import NullPool

from cli import UserError

UNLOCKED = ("http", "https", "file", "databricks")  # MLflow stores that are not databases


def redacted(url: str) -> str:
    """`url` without its password, as it may appear in an error message."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1] if "@" in url else url


class DatabaseLock:
    """`with DatabaseLock(url, "name"):` - or acquire() and release() at different places."""

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name
        self._file: filelock.FileLock | None = None
        self._engine: sqlalchemy.Engine | None = None
        self._connection: sqlalchemy.Connection | None = None
        # advisory locks are keyed by a 64-bit integer: one per lock name
        self._key = zlib.crc32(name.encode())
        scheme = url.partition(":")[0].partition("+")[0]
        if scheme == "sqlite":
            path = sqlalchemy.make_url(url).database
            if path and path != ":memory:":
                self._file = filelock.FileLock(f"{Path(path).resolve()}.lock")
        elif scheme in ("postgresql", "postgres"):
            self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        elif scheme not in UNLOCKED:
            raise UserError(f"{redacted(url)}: unsupported database {scheme!r}: a shared study "
                            "and MLflow store need sqlite:///PATH or postgresql://HOST/DB")

    @property
    def held(self) -> bool:
        return bool(self._file and self._file.is_locked) or self._connection is not None

    def acquire(self) -> None:
        if self._file is not None:
            self._file.acquire()
        elif self._engine is not None and self._connection is None:
            try:
                connection = self._engine.connect()
            except sqlalchemy.exc.OperationalError as error:
                reason = str(error.orig or error).strip().splitlines()[0]
                raise UserError(f"cannot reach the database {redacted(self.url)}: "
                                f"{reason}") from None
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                                   {"key": self._key})
                connection.commit()
            except BaseException:
                connection.close()
                raise
            self._connection = connection

    def release(self) -> None:
        """Release if held; safe to call twice."""
        if self._file is not None:
            if self._file.is_locked:
                self._file.release()
        elif self._connection is not None:
            connection, self._connection = self._connection, None
            try:  # closing the session releases its advisory locks as well
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": self._key})
                connection.commit()
            finally:
                connection.close()

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
