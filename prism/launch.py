"""Bring a whole deployment up on this machine: the encoder, prefill, decode and scheduler
services as separate processes on loopback, each health-checked before the next starts.

Used by `prism up`, `prism demo`, the end-to-end tests and the benchmarks.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prism.runtime.procs import Supervisor
from prism.wire import GLIBC_TUNABLES

REPO_ROOT = Path(__file__).resolve().parent.parent

SERVICES = {
    "encoder": "prism.v1.EncoderService",
    "prefill": "prism.v1.PrefillService",
    "decode": "prism.v1.DecodeService",
    "scheduler": "prism.v1.PrismService",
}


@dataclass(frozen=True)
class DeploymentOptions:
    model_dir: Path
    dtype: str = "float32"
    device: str = "cpu"
    #: torch threads per stage process (0: torch's default).
    threads: int = 1
    slots: int = 16
    max_len: int = 2048
    host: str = "127.0.0.1"
    #: Fixed scheduler port (0: any free port).
    port: int = 0
    log_dir: Path | None = None
    #: Extra arguments per service, e.g. {"scheduler": ["--max-images", "4"]}.
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    start_timeout_s: float = 180.0


class Deployment:
    """A running deployment; use as a context manager (stops everything on exit)."""

    def __init__(self, options: DeploymentOptions):
        self.options = options
        self._tmp: tempfile.TemporaryDirectory | None = None
        log_dir = options.log_dir
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="prism-logs-")
            log_dir = Path(self._tmp.name)
        self.log_dir = Path(log_dir)
        self.supervisor = Supervisor(self.log_dir, env={"GLIBC_TUNABLES": GLIBC_TUNABLES}, host=options.host,
                                     start_timeout_s=options.start_timeout_s, cwd=REPO_ROOT)

    @property
    def address(self) -> str:
        """The scheduler's (public) address."""
        return self.supervisor["scheduler"].address

    def endpoints(self) -> dict[str, str]:
        return self.supervisor.endpoints()

    def _start(self, stage: str, args: list[str]) -> str:
        o = self.options
        argv = ["--host", o.host, *args, *o.extra_args.get(stage, [])]
        return self.supervisor.start_service(stage, argv, health_service=SERVICES[stage]).address

    def start(self) -> "Deployment":
        o = self.options
        model = ["--model-dir", str(o.model_dir), "--dtype", o.dtype, "--device", o.device, "--threads", str(o.threads)]
        try:
            encoder = self._start("encoder", model)
            prefill = self._start("prefill", model)
            decode = self._start("decode", [*model, "--slots", str(o.slots), "--max-len", str(o.max_len)])
            sched = ["--model-dir", str(o.model_dir), "--encoder", encoder, "--prefill", prefill, "--decode", decode,
                     "--max-context", str(o.max_len)]
            if o.port:
                sched += ["--port", str(o.port)]
            self._start("scheduler", sched)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int | None]:
        codes = self.supervisor.stop_all()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
        return codes

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
