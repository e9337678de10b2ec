"""What the command-line tools share: bad input, a full disk or a held folder ends the run with one line
naming what is wrong.

The library raises these for what a user can fix (a setting, a file, a data line, a checkpoint, a missing
extra, a disk that filled up, an out_dir another run holds); the tools print the message without a traceback
and exit with status 2. A run stopped by SIGTERM or SIGINT prints where its checkpoint is and exits with
128 + the signal's number, as a shell reports it. Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .atomic import WriteError
from .config import ConfigError
from .data import DataError
from .engines import EngineError
from .files import CheckpointError, FileFormatError
from .gguf_export import ExportError
from .guard import NonFiniteError
from .lock import LockError
from .plan import PlanError
from .preemption import Interrupted

INPUT_ERRORS = (ConfigError, FileFormatError, DataError, CheckpointError, ExportError, EngineError, NonFiniteError,
                PlanError, FileNotFoundError, WriteError, LockError)


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except Interrupted as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(stopped.exit_status)
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
