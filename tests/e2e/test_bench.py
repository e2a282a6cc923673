"""`prism bench` as a user runs it, against a real deployment of the tiny LLaVA (processes):
every request of the trace is sent and accounted for, with its traced images and its forced
output length, and the report and plots are written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism.launch import Deployment, DeploymentOptions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_prism_bench_against_a_deployment(tiny_models, tmp_path):
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,NumImages,ContextTokens,GeneratedTokens"]
    rows += [f"{k * 0.35:.2f},{k % 3},{400 + 40 * k},{40 + 8 * k}" for k in range(10)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    options = DeploymentOptions(model_dir=tiny_models["llava"], layout="colocated", placement="colocated",
                                log_dir=tmp_path / "logs")
    with Deployment(options) as dep:
        proc = subprocess.run(
            [sys.executable, "-m", "prism.cli", "bench", "--address", dep.address, "--trace", str(trace),
             "--out", str(out), "--rate-scale", "1", "--duration", "4", "--start", "0", "--image-side", "96",
             "--ttft-slo", "60000", "--tpot-slo", "60000", "--search", "--search-probes", "2"],
            capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    run = report["run"]
    # nothing lost: every request of the window was sent and ended one way or the other
    assert run["requests"] == run["sent"] == 10
    assert run["completed"] + run["failed"] == run["sent"]
    assert sum(run["counts"].values()) == run["sent"]
    assert run["counts"] == {"OK": 10}
    records = report["records"]
    assert len(records) == 10
    assert [r["num_images"] for r in records] == [k % 3 for k in range(10)]
    # output lengths forced to the traced ones (x1/8): 5, 6, 7, ...
    assert [r["expected_tokens"] for r in records] == [5 + k for k in range(10)]
    assert [r["tokens"] for r in records] == [r["expected_tokens"] for r in records]
    assert run["good"] == 10 and run["slo_attainment"] == 1.0  # a 60 s SLO
    assert report["model_limits"]["image_tokens"] > 0
    # the search ran its two probes (the run itself, then twice the rate)
    assert [p["scale"] for p in report["max_load"]["probes"]] == [1.0, 2.0]
    for name in ("latency_cdf.png", "goodput_vs_load.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "wrote" in proc.stdout and "TTFT" in proc.stdout
