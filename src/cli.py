"""What every entry point does with errors: a user's error in one line, a bug with its traceback.

A `UserError` (bad params, a missing or corrupt input, a failed download, a diverging run, an
MLflow run the store does not have) carries a message meant for the user: `run` prints it as
`stage: error: message` on stderr and exits with status 1. Anything else is a bug, in our code or
a library's, and propagates with its traceback (Python exits with status 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure the user can fix; its message says what failed (and what to do)."""


class StageError(UserError):
    """A failure with a message for the user (a missing input, a failed download, a NaN loss)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup (MLflow run status) happens."""


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
