#!/usr/bin/env bash
# Run by device_checks.sh after the CUDA build (LLAMA_SERVER_BIN set): the wrapper's own GPU-side checks.
set -uo pipefail
python3 -m wrapper hw --json > "$OUT/hw.json" 2>&1; echo "hw rc=$?"
timeout 120 python3 benchmarks/plan_vs_vram.py --fa-off --out /tmp/pvv > "$OUT/plan_vs_vram.md" 2>&1
echo "plan_vs_vram rc=$?"; cat "$OUT/plan_vs_vram.md"
timeout 200 python3 benchmarks/bench_search.py --grid gpu --model /tmp/pvv/synth-2g.gguf --out /tmp/bs \
  > "$OUT/bench_search_gpu.log" 2>&1; echo "bench rc=$?"
tail -30 "$OUT/bench_search_gpu.log"
cp /tmp/bs/grid/report.html "$OUT/report_gpu.html" 2>/dev/null
