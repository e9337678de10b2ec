"""Score one article for one profile, or a JSONL of them: `stratos-lite score` from a clone.

    python tools/score.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["score", *sys.argv[1:]])
