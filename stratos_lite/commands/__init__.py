"""The `stratos-lite` command (also `python -m stratos_lite`): one subcommand a job.

    stratos-lite demo                         the whole pipeline on the embedded demo (runs/demo)
    stratos-lite train --config FILE          train (planned first; resumes from out_dir's checkpoints)
    stratos-lite plan --config FILE           will it fit, and how long will it take?
    stratos-lite evaluate / score / merge / imatrix / export / make-demo-data

Bad input ends a command with one `error: ...` line and status 2 (cli.py); `stratos-lite COMMAND --help`
shows each command's options. The scripts in tools/ run the same commands from a clone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import demo_data, evaluate, export, imatrix, merge, score, train
from .errors import run

# name -> (module, function): each module says what its command does (SUMMARY), what it takes
# (add_arguments) and does it (main).
COMMANDS = {
    "demo": train.DEMO, "train": train.TRAIN, "plan": train.PLAN, "evaluate": evaluate.COMMAND,
    "score": score.COMMAND, "merge": merge.COMMAND, "imatrix": imatrix.COMMAND,
    "export": export.COMMAND, "make-demo-data": demo_data.COMMAND,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stratos-lite", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, description=command.description,
                                  epilog=command.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(command_main=command.main, command_parser=sub)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(lambda: args.command_main(args))
