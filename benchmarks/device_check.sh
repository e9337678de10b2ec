#!/usr/bin/env bash
# One prepared device check on one NVIDIA or AMD GPU (about 8 minutes): environment, the attention kernel
# each SDPA call gets, the tests that run on a device, step speed at Qwen3-0.6B's and Qwen3-8B's shapes
# against HF Trainer + PEFT, and greedy decoding against transformers. One table on stdout.
#
#   bash benchmarks/device_check.sh             # on the GPU machine
#   bash benchmarks/device_check.sh --dry-run   # toy sizes, any machine (what CI runs on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import transformers, peft" 2>/dev/null || python -m pip install -q -e ".[dev]"
exec python benchmarks/device_check.py "$@"
