#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, for its Python (CPython 3.12, manylinux x86-64), into FOLDER (default
# .whl), for benchmarks/device_check.sh to install there without a registry. Run it where pip reaches one.
#
#   bash benchmarks/device_wheels.sh [FOLDER]
#
# What its image lacks of what stratos_lite and the check import: gguf (at the version installed here). Its own
# needs (numpy, pyyaml, requests, tqdm) and everything else the check imports (torch, transformers, peft,
# safetensors, tokenizers, scipy, pytest) are in the image, so nothing more is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
gguf_version=$(python3 -c 'from importlib.metadata import version; print(version("gguf"))' 2>/dev/null || echo 0.19.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$folder" "gguf==$gguf_version"
ls "$folder"
