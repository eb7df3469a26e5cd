#!/usr/bin/env bash
# Run by device_checks.sh after the CUDA build (LLAMA_SERVER_BIN set): the wrapper's own GPU-side checks.
# DEVICE_EXTRA picks: hw (wrapper hw --json), pvv (plan vs VRAM, benchmarks/plan_vs_vram.py),
# bench (bench-profile grid vs adaptive on a 1.4 GB synthetic model).
set -uo pipefail
extra=" ${DEVICE_EXTRA:-hw pvv bench} "
if [[ $extra == *" hw "* ]]; then python3 -m wrapper hw --json > "$OUT/hw.json" 2>&1; echo "hw rc=$?"; fi
if [[ $extra == *" pvv "* ]]; then
  timeout 120 python3 benchmarks/plan_vs_vram.py --fa-off --out /tmp/pvv > "$OUT/plan_vs_vram.md" 2>&1
  echo "plan_vs_vram rc=$?"; cat "$OUT/plan_vs_vram.md"
fi
if [[ $extra == *" bench "* ]]; then
  python3 -c "from wrapper import tiny_models as t; t.write('/tmp/bench-1.5g.gguf', t.TinySpec(n_layer=16, \
n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_ctx_train=32768, dtype='f16', seed=3))"
  timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/bench_search.py --grid gpu --model /tmp/bench-1.5g.gguf \
    --out /tmp/bs > "$OUT/bench_search_gpu.log" 2>&1; echo "bench rc=$?"
  tail -20 "$OUT/bench_search_gpu.log"
  cp /tmp/bs/grid/results.csv "$OUT/bench_grid_gpu.csv" 2>/dev/null
  cp /tmp/bs/adaptive/results.csv "$OUT/bench_adaptive_gpu.csv" 2>/dev/null
fi
