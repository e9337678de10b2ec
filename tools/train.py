"""Train a DoRA adapter (or the whole model), plan a run, or run the embedded demo: `stratos-lite train`
from a clone.

    python tools/train.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
