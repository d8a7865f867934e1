"""One training at a time per run folder: an exclusive flock on `<runs root>/.<run name>.lock`.

The lock file sits beside the run folder, so a run stopped by a bad input before training leaves
no run folder behind. The lock ends with the process (flock), even after kill -9; the file records
who holds it, for the message the second process prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import UserError


class RunFolderInUse(UserError):
    """Another process trains into the same run folder."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block, or raise RunFolderInUse naming the holder."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunFolderInUse(f"run folder {run_dir} is in use by {holder} (lock {path}); wait for it "
                                 "to end, or choose another log.run_name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
