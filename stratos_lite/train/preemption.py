"""Stopping on a signal without losing the step: SIGTERM (what schedulers and `kill` send before they take a
machine back) and SIGINT (Ctrl-C) ask the run to stop after the current optimizer step. The trainer then
writes a checkpoint at that step and raises `Interrupted`, whose message says where the checkpoint is and
how to resume; the tools exit with 128 + the signal's number, as a shell reports a process the signal
ended. A second signal stops at once, as if no handler were installed (checkpoints are atomic, so the
newest complete one is still there).
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; `exit_status` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopRequests:
    """While entered, the first SIGTERM or SIGINT is recorded in `received` (the loop looks at it between
    steps); the second goes to the handler that was there before. Handlers can be installed only in the
    main thread: elsewhere signals keep their usual effect."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name} received: finishing the current optimizer step, then writing a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        self._restore()
        signal.raise_signal(signum)
