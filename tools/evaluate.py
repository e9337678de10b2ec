"""Evaluate a model by generation on an eval JSONL: `stratos-lite evaluate` from a clone.

    python tools/evaluate.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
