"""The serving benchmark runs end to end (smoke: tiny model, 2 repetitions) and its summary holds up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_bench_smoke_interleaves_and_summarises() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serving.py"), "--smoke", "--concurrency", "1,8"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    cells = result["cells"]
    assert {c["rep"] for c in cells} == {0, 1} and sum(c["mode"] == "plain-loop" for c in cells) == 2
    assert all(c.get("failed", 0) == 0 for c in cells)
    # continuous batching let requests join running batches; window-only batching never does
    assert sum(c["joined"] for c in cells if c["mode"] == "continuous" and c["concurrency"] == 8) > 0
    assert all(c["joined"] == 0 for c in cells if c["mode"] == "window")
    assert {(s["mode"], s["mix"], s["concurrency"]) for s in result["summary"]} == {
        ("continuous", "single", 1), ("continuous", "mix", 1), ("continuous", "single", 8), ("continuous", "mix", 8),
        ("window", "single", 8), ("window", "mix", 8)}
    r = result["ratios"]["c8_over_plain_loop"]
    assert r["n"] == 2 and r["min"] <= r["median"] <= r["max"]
    sys.path.insert(0, str(ROOT / "bench"))
    import serving

    text = serving.table(result)
    assert "continuous / window" in text and "Medians of 2 interleaved repetitions" in text
