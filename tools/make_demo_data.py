"""Write the demo's synthetic data and tokenizer: `stratos-lite make-demo-data` from a clone.

    python tools/make_demo_data.py --help
"""

import sys

from stratos_lite.commands import main

if __name__ == "__main__":
    main(["make-demo-data", *sys.argv[1:]])
