#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source vendored in the llama-cpp-python sdist.
#
#   benchmarks/llamacpp/build_server.sh SDIST BUILD_DIR [--cpu] [-j N]
#
# SDIST is llama_cpp_python-0.3.36.tar.gz (pip download --no-deps --no-binary :all:
# llama-cpp-python==0.3.36) or the trimmed copy that `trim_sdist.sh` makes of it (same layout,
# small enough to carry to the GPU machine). No network is used: the web UI is neither built nor
# downloaded, no HTTPS, no NCCL. The binary ends in BUILD_DIR/build/bin/llama-server; the
# source tree (with gguf-py and the Llama-3 vocabulary GGUF) in BUILD_DIR/src.
#
# Default is CUDA for Hopper (sm_90) only. What keeps the build short:
#   - only the llama-server target is built (ninja), no tests, examples, app or other tools;
#   - CMAKE_CUDA_ARCHITECTURES=90: one architecture instead of the default seven;
#   - GGML_CUDA_FA_QUANTS=f16-f16: flash-attention kernels for an F16 KV cache only (the
#     default also compiles q4_0, q8_0 and bf16 caches);
#   - GGML_CUDA_COMPRESSION_MODE=none: no compressing of the device code (default: size);
#   - BUILD_SHARED_LIBS=OFF: one static binary, no shared libraries to link and find;
#   - ninja, -j every core (nvcc compiles each file on one core: about 140 CUDA files).
# Not cut (it would need patching llama.cpp's CMake): the quantised matmul kernels (mmq), which
# an F16 model never runs.
# --cpu builds without CUDA (for checking the script and the bench on a machine with no GPU).
set -euo pipefail

usage() { echo "usage: $0 SDIST BUILD_DIR [--cpu] [-j N]" >&2; exit 2; }
[ $# -ge 2 ] || usage
sdist=$1 dir=$2; shift 2
cuda=1 jobs=$(nproc)
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cuda=0 ;;
    -j) [ $# -ge 2 ] || usage; jobs=$2; shift ;;
    *) usage ;;
  esac
  shift
done
[ -f "$sdist" ] || { echo "$0: error: no such file: $sdist" >&2; exit 2; }

t0=$(date +%s)
mkdir -p "$dir"
src=$dir/src
if [ ! -f "$src/CMakeLists.txt" ]; then
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  # Only vendor/llama.cpp, without what the server's build never reads.
  mapfile -t excl < <(sed 's/^/--exclude=/' "$(dirname "$0")/trim.exclude")
  tar -xzf "$sdist" -C "$src.tmp" --strip-components=3 --wildcards '*/vendor/llama.cpp/*' "${excl[@]}"
  mv "$src.tmp" "$src"
fi
echo "build_server: source in $src ($(($(date +%s) - t0)) s)" >&2

opts=(
  -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  -DGGML_CCACHE=OFF
)
if [ $cuda = 1 ]; then
  if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
  fi
  opts+=(
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_QUANTS=f16-f16
    -DGGML_CUDA_COMPRESSION_MODE=none -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON
  )
fi
cmake -S "$src" -B "$dir/build" "${opts[@]}" >"$dir/cmake.log" 2>&1 \
  || { tail -40 "$dir/cmake.log" >&2; echo "$0: error: cmake configure failed ($dir/cmake.log)" >&2; exit 1; }
echo "build_server: configured ($(($(date +%s) - t0)) s)" >&2
cmake --build "$dir/build" --target llama-server -j "$jobs" >"$dir/build.log" 2>&1 \
  || { tail -40 "$dir/build.log" >&2; echo "$0: error: build failed ($dir/build.log)" >&2; exit 1; }
"$dir/build/bin/llama-server" --version >&2 || true
echo "build_server: $dir/build/bin/llama-server built in $(($(date +%s) - t0)) s" >&2
