"""scripts/plot_gpu_bench.py draws the committed H200 results (docs/benchmarks.md embeds them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_plots_one_and_several_gpu_bench_results(tmp_path):
    results = [ROOT / "docs" / "gpu-bench-h200-repeat-steady.json", ROOT / "docs" / "gpu-bench-h200-repeat-steady-2.json"]
    for inputs, name in ((results[:1], "one.png"), (results, "two.png")):
        out = tmp_path / name
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_gpu_bench.py"), *map(str, inputs),
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert out.stat().st_size > 20_000  # three panels, not an empty canvas
