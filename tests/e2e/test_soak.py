"""The soak test in its short form (the long one: `python benchmarks/soak.py`): the whole system
as processes at twice its sustainable rate, then half of it. Nothing is lost (every request ends
with its tokens or a precise status), the queues drain, memory comes back to its baseline and
latency recovers."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_overload_then_recovery_loses_nothing(tiny_models, tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up
    spec.loader.exec_module(soak)
    report = soak.run(tiny_models["llava"], calibrate_s=6, baseline_s=8, overload_s=25, recover_s=15,
                      log_dir=tmp_path / "logs")
    over = report["phases"]["overload"]
    assert report["lost"] == 0, report["lost_by_kind"]
    assert report["succeeded"] > 0 and over["sent"] >= 2 * report["phases"]["baseline"]["sent"], report["phases"]
    assert report["queues_drained"], report
    assert report["memory_returned"], report["memory"]
    assert report["latency_recovered"], report["phases"]
