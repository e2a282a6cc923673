"""What the benchmark scripts share: progress lines on stderr, the quiet-CPU gate, quantiles,
and the `small` LLaVA checkpoint they measure."""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL_MODEL_DIR = ROOT / ".bench" / "models" / "llava-small"
#: The production traces shared beside the repository (`../shared/traces`).
TRACES_DIR = ROOT.parent / "shared" / "traces"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_busy(seconds: float = 0.5) -> float:
    """Busy fraction of all CPUs over `seconds` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


class QuietGate:
    """Before a measured run, wait (up to `max_wait_s`) until the machine is idle: this is a
    shared 2-core box, and a foreign process running torch turns our OpenMP threads' spinning
    into a 4-5x slowdown. Our own services are idle between runs, so busy CPU is someone else's."""

    def __init__(self, threshold: float, max_wait_s: float):
        self.threshold, self.max_wait_s = threshold, max_wait_s
        self.waited_s, self.noisy_runs, self.runs = 0.0, 0, 0

    def wait(self) -> float:
        """Blocks until quiet (or the limit); returns the busy fraction last seen."""
        busy = cpu_busy()
        if self.max_wait_s <= 0:
            return busy
        self.runs += 1
        started = time.perf_counter()
        while busy > self.threshold:
            if time.perf_counter() - started > self.max_wait_s:
                self.noisy_runs += 1
                say(f"machine still {busy:.0%} busy after {self.max_wait_s:.0f} s; measuring anyway")
                break
            time.sleep(1.0)
            busy = cpu_busy()
        self.waited_s += time.perf_counter() - started
        return busy

    async def wait_async(self) -> float:
        """`wait` off the event loop."""
        return await asyncio.to_thread(self.wait)

    def summary(self) -> dict:
        return {"threshold": self.threshold, "runs_gated": self.runs,
                "runs_under_foreign_load": self.noisy_runs, "waited_s": round(self.waited_s, 1)}


#: The one gate of a benchmark process (each script sets its `max_wait_s` from --quiet-wait).
GATE = QuietGate(0.15, 0)


def med(xs) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def pct(sorted_xs: list, q: float):
    """The `q` quantile (nearest rank) of an ascending list; None when empty."""
    if not sorted_xs:
        return None
    return sorted_xs[min(len(sorted_xs) - 1, max(0, int(q * len(sorted_xs))))]


def rnd(x, digits: int = 2):
    return None if x is None else round(x, digits)


def ensure_model(model_dir: Path = SMALL_MODEL_DIR) -> Path:
    """The small LLaVA (184M, seeded), built on first use."""
    if not (model_dir / "config.json").is_file():
        from prism.models.builder import make_model

        say(f"building the small LLaVA into {model_dir}")
        make_model("llava", "small", model_dir, seed=0)
    return model_dir


def finish_report(report: dict, out: Path | None, started: float) -> None:
    """Close the machine section (gate summary, load at the end, wall time), print the ONE JSON
    report on stdout and write it to `out` when given."""
    report.setdefault("machine", {})["quiet_gate"] = GATE.summary()
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text, flush=True)
