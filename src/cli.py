"""What every entry point does with errors: one line on stderr and a non-zero exit, no traceback.

Expected failures (bad params, bad data, a failed download) are `ValueError`s or `OSError`s raised
with a message meant for the user. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup (MLflow run status) happens."""


class StageError(RuntimeError):
    """A failure with a message for the user (a bad archive, a failed download, a NaN loss)."""


def run(stage: str, main: Callable[[], object]) -> None:
    """Call `main()`; turn an expected failure into `stage: error: message` and exit status 1."""
    try:
        main()
    except (StageError, ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{stage}: error: {message}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print(f"{stage}: terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        sys.exit(130)
