#!/usr/bin/env bash
# Install llama-cpp-python, the GGUF oracle of the tests and the engine of `evaluate.py --gguf`, built for
# any x86-64 machine rather than for this one's CPU.
#
# pip builds llama.cpp from source with -march=native by default and caches the wheel under a key that
# ignores CMAKE_ARGS, so a wheel built on one CPU (an AMD EPYC, say) can be reused on another (a Xeon) and
# die there with SIGILL. Here the wheel is built once with GGML_NATIVE=OFF (AVX2/FMA/F16C, the baseline of
# the machines we run on) into a folder of its own, and installed from that file; pip records the file in
# the package's direct_url.json, which is how a later run tells a portable install from any other.
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.16}"
cmake_args="-DGGML_NATIVE=OFF"
# One folder per version and build flags, so a wheel built with other flags is never taken for this one.
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/stratos_lite/llama-cpp-portable/$version${cmake_args//[ =]/_}"

installed_from_portable_wheel() {
    python - "$version" "$wheel_dir" <<'PY'
import json, sys
from importlib.metadata import PackageNotFoundError, distribution
version, wheel_dir = sys.argv[1:]
try:
    dist = distribution("llama_cpp_python")
except PackageNotFoundError:
    sys.exit(1)
origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
sys.exit(0 if dist.version == version and origin.startswith(f"file://{wheel_dir}/") else 1)
PY
}

# A llama-cpp-python built with GPU support (CUDA, ROCm, Metal, Vulkan) is the user's own choice: never
# replace it with this CPU build.
if python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    echo "llama-cpp-python with GPU offload is installed: keeping it (not replaced by the portable CPU build)"
    exit 0
fi
if installed_from_portable_wheel; then
    exit 0
fi
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version for any x86-64 CPU (CMAKE_ARGS=$cmake_args; about 6 min, once)"
    mkdir -p "$wheel_dir.partial"
    CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 python -m pip wheel -q --no-deps --no-cache-dir \
        --no-binary llama-cpp-python -w "$wheel_dir.partial" "llama-cpp-python==$version"
    rm -rf "$wheel_dir" && mv "$wheel_dir.partial" "$wheel_dir"
fi
python -m pip install -q --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
python -m pip install -q "llama-cpp-python==$version"   # its pure-Python dependencies
