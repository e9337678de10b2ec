"""What a subcommand is: a summary line, a description, its arguments and what it does."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    summary: str  # one line, in `stratos-lite --help`
    description: str  # the usage examples, in `stratos-lite COMMAND --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], None]  # args.command_parser is the command's own parser
    epilog: Callable[[], str | None] = lambda: None  # more help, made when --help is built
