#!/usr/bin/env bash
# Build llama.cpp's own `llama-imatrix` and `llama-quantize` from the llama.cpp source that llama-cpp-python
# vendors (the version scripts/install_llama_cpp.sh installs): the oracles the importance-matrix tests compare
# with. Built for any x86-64 CPU (GGML_NATIVE=OFF, as the library build), once, into a cache folder; prints
# the folder holding the two programs. Tests only: the library never runs them.
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.16}"
tools_dir="${XDG_CACHE_HOME:-$HOME/.cache}/stratos_lite/llama-tools/$version-portable"
if [ -x "$tools_dir/llama-imatrix" ] && [ -x "$tools_dir/llama-quantize" ]; then
    echo "$tools_dir"
    exit 0
fi
command -v cmake >/dev/null || python -m pip install -q cmake
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "building llama-imatrix and llama-quantize from llama-cpp-python $version's llama.cpp (about 2 min, once)" >&2
python -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$source_dir" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$work/build" --target llama-imatrix llama-quantize -j "$(nproc)" >&2
mkdir -p "$tools_dir.partial"
cp "$work/build/bin/llama-imatrix" "$work/build/bin/llama-quantize" "$tools_dir.partial/"
rm -rf "$tools_dir" && mv "$tools_dir.partial" "$tools_dir"
echo "$tools_dir"
