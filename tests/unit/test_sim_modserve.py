"""benchmarks/modserve_sim.py --quick: one JSON report with the ratios ModServe reports."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def synthetic_trace(path: Path, rows: int = 19_000, seconds: float = 3600.0) -> Path:
    """An hour of arrivals in the Azure trace's columns (the real traces live outside the
    repository, `../shared/traces`, which a fresh clone does not have)."""
    rng = random.Random(7)
    start = datetime(2023, 11, 16, 18, 0, 0)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t in sorted(rng.uniform(0, seconds) for _ in range(rows)):
        stamp = (start + timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.%f")
        lines.append(f"{stamp},{rng.randint(20, 4000)},{rng.randint(5, 600)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_quick_run_reports_the_ratios(tmp_path):
    out = tmp_path / "modserve.json"
    trace = synthetic_trace(tmp_path / "trace.csv")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "modserve_sim.py"), "--quick", "--models",
                           "llama32-11b-vision", "--day-s", "60", "--max-probes", "3", "--trace", str(trace),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    ratios = report["ratios"]
    assert set(ratios) == {"max_load_decoupled_over_monolith", "gpus_saved_by_autoscaling"}
    assert set(ratios["max_load_decoupled_over_monolith"]) == {"llama32-11b-vision"}
    model = report["models"]["llama32-11b-vision"]
    assert {"modserve", "a100", "llama32-card"} <= {s["id"] for s in model["sources"]}
    assert set(model["max_load"]) == {"monolith", "decoupled"}
    assert sum(model["decoupled_pools_gpus"].values()) == 128
    assert model["slo"]["ttft_ms"] > 0 and model["slo"]["tpot_ms"] > 0
    day = model["autoscaling"]
    assert set(day) >= {"static", "autoscaled", "gpus_saved"}
    assert day["static"]["mean_gpus"] == 128.0
    assert report["paper"] == {"max_load_ratio": [3.3, 5.5], "gpus_saved": [0.25, 0.413]}
