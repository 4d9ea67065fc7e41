"""What every entry point does with errors and signals: a user's error in one line, a bug with
its traceback, SIGTERM and Ctrl-C as exceptions that cleanup sees.

A `UserError` (bad params, a missing or corrupt input, a failed download, a diverging run, an
MLflow run the store does not have) carries a message meant for the user: `run` prints it as
`stage: error: message` on stderr and exits with status 1. Anything else is a bug, in our code or
a library's, and propagates with its traceback (Python exits with status 1). Within
`interrupts_outside_database_code()` (tracking.run uses it around every MLflow run), SIGTERM
raises `Terminated` and Ctrl-C `KeyboardInterrupt`, never inside a database write; `run` exits
with 143 and 130 on them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class UserError(Exception):
    """A failure the user can fix; its message says what failed (and what to do)."""


class StageError(UserError):
    """A failure with a message for the user (a missing input, a failed download, a NaN loss)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup (MLflow run status) happens."""


RESIGNAL_SECONDS = 0.05  # retry of a signal that landed in database code
UNSEEN_SECONDS = 1.0  # retry of an interrupt that no run's cleanup has seen by then
DATABASE_CODE = ("mlflow.", "sqlalchemy.")  # modules whose frames may be inside a store write
_unseen: set[int] = set()  # signals raised as interrupts that no run's cleanup has seen yet


def _send_again(signum: int, delay: float, only_if_unseen: bool = False) -> None:
    def again():
        if not only_if_unseen or signum in _unseen:
            os.kill(os.getpid(), signum)

    timer = threading.Timer(delay, again)
    timer.daemon = True
    timer.start()


def _in_database_code(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(DATABASE_CODE):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame):
    """SIGTERM raises `Terminated`, SIGINT `KeyboardInterrupt`, outside database code only.

    Raised inside a write of the tracking store (or of an Optuna study), the exception would leave
    that write's transaction open: SQLite stays locked, the run cannot be marked KILLED, and the
    store's "database is locked" error replaces the interrupt. There, the signal is sent again a
    moment later, until it lands outside. Raised inside a weakref callback or a `__del__` (the
    garbage collector runs them anywhere), Python prints the exception and goes on: so it is sent
    again until a run's cleanup has seen it.
    """
    if _in_database_code(frame):
        _send_again(signum, RESIGNAL_SECONDS)
        return
    _unseen.add(signum)
    _send_again(signum, UNSEEN_SECONDS, only_if_unseen=True)
    if signum == signal.SIGTERM:
        raise Terminated(f"signal {signum}")
    raise KeyboardInterrupt


def interrupt_seen() -> None:
    """Say that cleanup has seen the interrupt: it is not sent again (see `_on_signal`)."""
    _unseen.clear()


@contextlib.contextmanager
def interrupts_outside_database_code() -> Iterator[None]:
    """`_on_signal` for SIGTERM, and for SIGINT unless it is ignored (a background job's); the
    handlers before it are back on exit. Only the main thread may install handlers: elsewhere,
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, _on_signal) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(stage: str, main: Callable[[], object]) -> None:
    """Call `main()`; turn a `UserError` into `stage: error: message` and exit status 1."""
    try:
        main()
    except UserError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{stage}: error: {message}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print(f"{stage}: terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        sys.exit(130)
