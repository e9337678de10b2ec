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

from ..config import ConfigError
from ..data.records import DataError
from ..evaluation.engines import EngineError
from ..export.errors import ExportError
from ..planning.report import PlanError
from ..storage.atomic import WriteError
from ..storage.files import FileFormatError, ModelFileError
from ..storage.lock import LockError
from ..train.guard import NonFiniteError
from ..train.preemption import Interrupted

INPUT_ERRORS = (ConfigError, FileFormatError, DataError, ModelFileError, ExportError, EngineError, NonFiniteError,
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
