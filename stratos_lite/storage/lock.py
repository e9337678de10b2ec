"""One writer per out_dir: a second run pointed at a folder that a live run holds is refused at start.

The lock is `out_dir/.lock`, held with flock(2) for the life of the run and holding the owner's pid, host
and start time. The kernel drops a flock when its process dies however it dies (SIGKILL, OOM killer), so a
lock file whose flock is free was left by a dead run (or a power loss): it is taken over with a warning
naming the run that left it. A clean end empties the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The out_dir is held by another live run; the message names the folder and that process."""


class StaleLockWarning(UserWarning):
    """A lock left by a run that is no longer alive was taken over."""


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (started {started})"


class OutDirLock:
    """Held from `acquire()` to `release()`; `with OutDirLock(folder):` does both."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> OutDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held open for the life of the lock)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._owner(file)
            file.close()
            raise LockError(f"{self.path.parent} is in use by another run: {_describe(owner)}. Wait for it to "
                            "finish, stop it, or choose another out_dir.") from None
        left_behind = self._owner(file)
        if left_behind:
            message = (f"{self.path}: taking over a lock left by {_describe(left_behind)}, which is no longer "
                       "running (killed, or the machine went down)")
            warnings.warn(message, StaleLockWarning, stacklevel=2)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        file.flush()
        self._file = file
        return self

    @staticmethod
    def _owner(file) -> dict:
        file.seek(0)
        try:
            return json.loads(file.read() or "{}")
        except ValueError:  # written half by a process that died mid-write
            return {"pid": "?", "host": "?"}

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # empty: the next run sees a clean end, not a stale lock
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def held_by_rank0(out_dir: str | Path, strategy):
    """out_dir's lock for a run's duration, held by rank 0 (the rank that writes); when rank 0 is refused,
    every rank stops before the run's first collective (`strategy.any_rank` decides it together)."""
    lock, refused = OutDirLock(out_dir), None
    if strategy.is_main:
        try:
            lock.acquire()
        except LockError as error:
            refused = error
    if strategy.any_rank(refused is not None):
        raise refused or LockError(f"{out_dir}: rank 0 could not take the out_dir's lock")
    try:
        yield
    finally:
        lock.release()
