"""Verification cost on restart: full SHA-256 re-hash vs the verified-marker fast path.

    .venv/bin/python scripts/bench_acquire.py [SIZE_MB]   (default 200)

Writes a SIZE_MB GGUF (one f32 tensor) into a temp dir, then times `acquire._verify_local` (GGUF header check
+ full hash + marker write, what a first start does) and `acquire._fast_path` (GGUF header check + marker
match, what every later start does). Reports the median of 5 runs each.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import gguf

    from wrapper.model import acquire

    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tensor("t", np.random.default_rng(0).random(size_mb * 2**18, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        full, fast = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            assert acquire._verify_local(path, None, None) is not None
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert acquire._fast_path(path, None) is not None
            fast.append(time.perf_counter() - t0)
        mb = path.stat().st_size / 2**20
        f, q = statistics.median(full), statistics.median(fast)
        print(f"file {mb:.0f} MiB (page cache warm)")
        print(f"full verify (header + sha256): {f * 1000:.0f} ms ({mb / f:.0f} MiB/s)")
        print(f"marker fast path (header + marker): {q * 1000:.2f} ms ({f / q:.0f}x faster)")


if __name__ == "__main__":
    main()
