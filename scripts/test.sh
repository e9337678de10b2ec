#!/usr/bin/env bash
# Install what the test suite needs, then run it. torch is installed only when missing (set TORCH_SPEC to
# choose a build; the default is the CPU wheel this project's machines carry), so a CUDA or ROCm torch you
# already have is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
# TORCH_SPEC is split into words, so it may carry pip options: "torch --index-url URL" for ROCm or CUDA wheels.
# shellcheck disable=SC2086
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
bash scripts/install_llama_cpp.sh   # the GGUF oracle, built for any x86-64 CPU (not -march=native)
python -m pip install -q -e ".[dev]"
# llama.cpp's llama-imatrix and llama-quantize, the importance-matrix oracles (built once, cached).
STRATOS_LLAMA_TOOLS="$(bash scripts/build_llama_tools.sh)"
export STRATOS_LLAMA_TOOLS
# Two workers by default (TEST_WORKERS=0 runs in one process): the suite spends much of its time starting
# interpreters and ranks, which a second worker overlaps even on two cores.
python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
