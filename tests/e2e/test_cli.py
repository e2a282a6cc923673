"""The `prism` command as a user runs it: `prism up` serves until Ctrl-C and leaves no process
behind; `prism demo` sends its four requests and prints them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from prism.client import PrismClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_prism_up_serves_and_stops_everything_on_ctrl_c(tiny_models, tmp_path):
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "up", "--model", str(tiny_models["llava"]), "--port", "0",
         "--max-len", "256", "--slots", "2", "--log-dir", str(log_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    try:
        deadline = time.time() + 180
        address = None
        while time.time() < deadline and address is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.match(r"serving on (\S+);", line):
                address = m.group(1)
        assert address, "".join(lines)
        assert {"redis", "encode-1", "prefill-1", "decode-1", "scheduler"} <= {
            ln.split()[0] for ln in lines if ln.startswith("  ")}
        with PrismClient(address) as client:
            done = client.complete(prompt="hello", max_new_tokens=4, ignore_eos=True)
        assert len(done.token_ids) == 4
        children = subprocess.run(["pgrep", "-f", "--", f"--model-dir {tiny_models['llava']}"], capture_output=True,
                                  text=True).stdout.split()
        redis_url = next(ln.split()[1] for ln in lines if ln.startswith("  redis "))
        host_port = redis_url.split("//")[1].split("/")[0]  # redis-server shows "redis-server host:port"
        redis = subprocess.run(["pgrep", "-f", f"redis-server {host_port}"], capture_output=True, text=True).stdout.split()
        assert len(children) >= 4 and len(redis) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not [p for p in map(int, children + redis) if _alive(p)], "processes left running"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prism_demo_prints_its_four_requests(tmp_path):
    out = subprocess.run([sys.executable, "-m", "prism.cli", "demo", "--models-dir", str(tmp_path), "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    for title in ("text only", "one image", "two images", "audio"):
        assert title in out.stdout, out.stdout
