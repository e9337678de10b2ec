#!/usr/bin/env bash
# One prepared device check on one NVIDIA or AMD GPU (about 4 minutes on one H100; the rows are in
# benchmarks/device_check.py), offline: a lent GPU machine reaches no package registry.
#
#   bash benchmarks/device_wheels.sh                           # here, with a registry: the wheels it lacks, in .whl/
#   bash benchmarks/device_check.sh --out results.md           # there, with .whl/ carried along
#   bash benchmarks/device_check.sh --dry-run --out results.md # toy sizes, on any machine (the test suite runs it)
#
# Every module the check imports is looked for with $PYTHON (default python3); what is missing is installed from
# the wheels in $STRATOS_WHEELS (default .whl) with --no-index into a folder of its own, never from a registry.
# When that is not enough the check names what is missing and stops (status 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${STRATOS_WHEELS:-.whl}
NEEDED=${STRATOS_NEEDED:-torch numpy safetensors tokenizers scipy tqdm gguf transformers peft pytest}

missing() {
    # shellcheck disable=SC2086
    "$PYTHON" -c 'import importlib.util, sys; print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))' $NEEDED
}

lacking=$(missing)
if [ -n "$lacking" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    lacking=$(missing)
fi
if [ -n "$lacking" ]; then
    echo "device_check: missing $lacking (looked for with $PYTHON, and in $WHEELS/); on a machine with a registry," \
         "bash benchmarks/device_wheels.sh fills $WHEELS/ with wheels for CPython 3.12 on x86-64: carry it along" >&2
    exit 2
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
