"""Expected failures end a command with one line on stderr, not a traceback.

    with errors.reported(debug):        # train.py
        ...
    errors.run_cli(main)                 # the evaluation commands' __main__

Exit code 2: the user's input is wrong (config, data, checkpoint, a run folder in use); exit code 1:
the run failed at run time (disk full, read-only or unreachable storage). Anything else is a bug
and keeps its traceback. `--debug` or COLORMAE_DEBUG=1 shows the traceback of every failure.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

USER_ERROR, RUNTIME_FAILURE = 2, 1
LAUNCHER_ERROR_FILE = "COLORMAE_ERROR_FILE"  # see leave_for_launcher
# OS errors that are the machine's state, not a bug: reported in one line with the file concerned
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class UserError(ValueError):
    """Bad input from the user (a config value, the data, a checkpoint, a run folder in use)."""


class DataError(UserError, FileNotFoundError):
    """The data folder is missing, empty, or holds no usable image."""


class RunFailure(RuntimeError):
    """The run could not go on for a reason outside the user's input (e.g. the disk is full)."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """`--debug` on the command line or COLORMAE_DEBUG=1 in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("COLORMAE_DEBUG", "") not in ("", "0")


def summary(err: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure, None for anything else (a bug)."""
    if isinstance(err, (UserError, *user_errors)):
        return USER_ERROR, str(err)
    if isinstance(err, RunFailure):
        return RUNTIME_FAILURE, str(err)
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        where = f": {err.filename}" if err.filename else ""
        return RUNTIME_FAILURE, f"{err.strerror or err}{where}"
    return None


@contextmanager
def reported(debug: bool = False, user_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an expected failure into `error: <message>` on stderr and SystemExit(2 or 1).

    The SystemExit carries the message (str) and the exit code (`.code`). `user_errors` adds
    exception types to treat as user errors (the evaluation commands check input with ValueError).
    """
    try:
        yield
    except Exception as err:
        found = None if debug else summary(err, user_errors)
        if found is None:
            raise
        code, message = found
        print(f"error: {message}", file=sys.stderr, flush=True)
        leave_for_launcher(code, f"error: {message}")
        stop = SystemExit(f"error: {message}")
        stop.code = code
        raise stop from err


def leave_for_launcher(code: int, message: str) -> None:
    """Append {"code", "message"} as a JSON line to the file named by $COLORMAE_ERROR_FILE when a launcher
    set it (docker/entrypoint.py around torchrun), so the launcher can end with the trainers' message
    and exit code instead of torchrun's ChildFailedError traceback and exit code 1."""
    path = os.environ.get(LAUNCHER_ERROR_FILE)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"code": code, "message": message}) + "\n")


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = (ValueError,
                                                                                  FileNotFoundError)) -> None:
    """Run a command's main() with one-line errors; `--debug` is taken out of sys.argv first."""
    debug = debug_requested()
    sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    with reported(debug, user_errors):
        main()
