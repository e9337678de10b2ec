#!/usr/bin/env bash
# Install what the demo needs (torch only when missing; set TORCH_SPEC to choose a build), then run the
# whole pipeline on the embedded demo: outputs under runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# TORCH_SPEC is split into words, so it may carry pip options: "torch --index-url URL" for ROCm or CUDA wheels.
# shellcheck disable=SC2086
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e .
python -m stratos_lite demo "$@"
