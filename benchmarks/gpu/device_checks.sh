#!/usr/bin/env bash
# One-shot GPU check for the device machine (results in docs/benchmarks.md): builds a CUDA llama-server from
# the carried llama.cpp source subset (.device/, see benchmarks/gpu/README.md), then runs the steps named in
# DEVICE_STEPS (default: all): nvml (recorded NVML reading), vram (real VRAM use of several placements),
# throughput (defaults vs a few configs), extra (wrapper hw, plan vs VRAM, bench-profile grid vs adaptive).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=" ${DEVICE_STEPS:-nvml vram throughput extra} "
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [[ $steps == *" nvml "* ]]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  python3 benchmarks/gpu/nvml_dump.py > "$OUT/nvml.json"
fi
if [ ! -d /tmp/b/build ]; then
  mkdir -p /tmp/b && tar xzf .device/llama-src-min.tar.gz -C /tmp/b
  # The source subset leaves out scripts/; the server's UI step needs this one file from it.
  mkdir -p /tmp/b/llama.cpp/scripts && cp .device/ui-assets.cmake /tmp/b/llama.cpp/scripts/
fi
t0=$(date +%s)
cmake -S /tmp/b/llama.cpp -B /tmp/b/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF > "$OUT/build.log" 2>&1 \
  && cmake --build /tmp/b/build --target llama-server -j 16 >> "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - t0 ))s"
BIN=/tmp/b/build/bin/llama-server
[ -x "$BIN" ] || { tail -40 "$OUT/build.log"; exit 1; }
"$BIN" --version 2>&1 | head -2
[[ $steps == *" vram "* ]] && timeout 240 python3 benchmarks/gpu/vram_runs.py --bin "$BIN" --out "$OUT"
[[ $steps == *" extra "* ]] && LLAMA_SERVER_BIN=$BIN OUT=$OUT timeout 330 bash benchmarks/gpu/extra.sh
[[ $steps == *" throughput "* ]] && (cd benchmarks/gpu && timeout 150 python3 throughput_runs.py --bin "$BIN" \
  --model /tmp/vram-models/dense-1.5g.gguf --out "$OUT")
ls -la "$OUT"
