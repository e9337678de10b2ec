"""Merge a DoRA adapter into its base model: `stratos-lite merge` from a clone.

    python tools/merge.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["merge", *sys.argv[1:]])
