"""Run a native oracle (llama.cpp) in a child interpreter, so that its crash fails one test, not the suite.

A native library built for another CPU dies with SIGILL, and a bad file can make one segfault or abort:
inside the pytest process that kills the whole run with no summary. `call_in_child` runs the call in a
fresh interpreter (the "spawn" start method: no forked torch or thread state) and hands back its result;
a child killed by a signal, or one that overruns its time, raises `ChildCrashed` naming the signal and the
call, and an exception raised in the child comes back as `ChildError` with the child's traceback.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from typing import Any


class ChildCrashed(AssertionError):
    """The child died by a signal, exited without a result, or ran past its timeout."""


class ChildError(AssertionError):
    """The call raised in the child; the message holds the child's traceback."""


def describe_call(function: Callable, args: tuple, kwargs: dict) -> str:
    shown = [_short_repr(a) for a in args] + [f"{k}={_short_repr(v)}" for k, v in kwargs.items()]
    return f"{function.__module__}.{function.__qualname__}({', '.join(shown)})"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_and_send(connection, function: Callable, args: tuple, kwargs: dict) -> None:
    try:
        result = ("ok", function(*args, **kwargs))
    except BaseException:  # everything, KeyboardInterrupt included, goes back to the parent as text
        result = ("error", traceback.format_exc())
    connection.send(result)
    connection.close()


def exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name} ({-exitcode})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode} without sending a result"


def call_in_child(function: Callable, *args, timeout: float = 300.0, **kwargs):
    """function(*args, **kwargs) run in a fresh interpreter; its (picklable) return value.

    `function` must be importable by module and name (a module-level function of a test helper module)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run_and_send, args=(send, function, args, kwargs), daemon=True)
    child.start()
    send.close()  # the parent keeps only the reading end, so the child's death shows as end-of-file
    call = describe_call(function, args, kwargs)
    try:
        if not receive.poll(timeout):
            child.kill()
            child.join()
            raise ChildCrashed(f"{call} did not finish within {timeout:g} s; the child was killed")
        status, payload = receive.recv()
    except EOFError:
        child.join()
        raise ChildCrashed(f"{call} crashed the child interpreter: {exit_description(child.exitcode)}") from None
    finally:
        receive.close()
    child.join()
    if status == "error":
        raise ChildError(f"{call} raised in the child:\n{payload}")
    return payload
