"""Export a model folder (+ adapter) to GGUF and a Modelfile: `stratos-lite export` from a clone.

    python tools/export_gguf.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["export", *sys.argv[1:]])
