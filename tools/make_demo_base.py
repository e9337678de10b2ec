"""Make the demo's profile-blind base and write it into the package (stratos_lite/demo/shipped_base/).

    python tools/make_demo_base.py [--demo-config FILE] [--work /tmp/demo_base] [--dest DIR]

The base phase of stratos_lite/demo/demo.toml (FILE's changes laid over it) on its seed's data, trained in float32
so that any CPU repeats it, then scored on the seed's held-out records (verdict errors per kind). The weights
(bf16), tokenizer and made_by.json (settings, the warmup's losses, the held-out reading) go to DIR, by default
the package's own folder, which the demo loads. Run it after changing the demo's data, model or [base]
settings; tests/test_demo_base.py says when the shipped base no longer matches what this makes. About 12
minutes on a 2-core CPU (2600 float32 steps at ~0.27 s).
"""

import argparse
import json
import shutil
from pathlib import Path

from stratos_lite.demo.base import VENDORED_BASE, make_vendored_base
from stratos_lite.demo.config import DEMO_TOML, DemoConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-config", type=Path, default=DEMO_TOML, help="changes over stratos_lite/demo/demo.toml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_base"), help="the base run's data and checkpoints")
    parser.add_argument("--dest", type=Path, default=VENDORED_BASE, help="where the base is written")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    record = make_vendored_base(DemoConfig.from_toml(args.demo_config), args.work, args.dest)
    print(json.dumps({k: record[k] for k in ("steps", "final_loss", "seconds", "held_out")}, indent=2))
    print(f"written to {args.dest}")


if __name__ == "__main__":
    main()
