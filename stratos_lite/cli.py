"""What the command-line tools share: bad input ends the run with one line naming what is wrong.

The library raises these for input a user can fix (a setting, a file, a data line, a checkpoint, a
missing extra); the tools print the message without a traceback and exit with status 2. Anything else is
a bug, and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .config import ConfigError
from .data import DataError
from .engines import EngineError
from .files import CheckpointError, FileFormatError
from .gguf_export import ExportError
from .guard import NonFiniteError
from .plan import PlanError

INPUT_ERRORS = (ConfigError, FileFormatError, DataError, CheckpointError, ExportError, EngineError, NonFiniteError,
                PlanError, FileNotFoundError)


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
