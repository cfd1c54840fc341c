#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-imatrix, llama-quantize, llama-perplexity, llama-bench) from
# the pinned llama-cpp-python source distribution, the same llama.cpp that pocketlm's runtime uses.
# The binaries are cached outside the repository; a second run only prints their folder.
#   bash bench/build_llamacpp.sh            -> prints the bin/ folder
set -euo pipefail
VERSION=0.3.36
CACHE="${POCKETLM_LLAMACPP_CACHE:-$HOME/.cache/pocketlm/llama.cpp-$VERSION}"
BIN="$CACHE/build/bin"
TOOLS="llama-imatrix llama-quantize llama-perplexity llama-bench"
STAMP="$CACHE/build/.flags"
if [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${LLAMA_CMAKE_ARGS:-}" ]; then
  echo "$BIN"; exit 0
fi
mkdir -p "$CACHE"
PY="${PYTHON:-python3}"
if [ ! -d "$CACHE/src" ]; then
  dl="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$dl" >&2
  mkdir -p "$CACHE/src"
  tar -xzf "$dl"/llama_cpp_python-"$VERSION".tar.gz -C "$CACHE/src" --strip-components=1
  rm -rf "$dl"
fi
# the same portable x86 flags the Makefile gives llama-cpp-python (see LLAMA_CMAKE_ARGS there)
# shellcheck disable=SC2086
cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release ${LLAMA_CMAKE_ARGS:-} \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >&2
# shellcheck disable=SC2086
cmake --build "$CACHE/build" --config Release -j "$(nproc)" --target $TOOLS >&2
echo "${LLAMA_CMAKE_ARGS:-}" > "$STAMP"
echo "$BIN"
