"""Bring a whole deployment up on this machine: Redis (unless one is given), the stage workers
and the scheduler as separate processes on loopback, each health-checked, and a local
supervisor that acts on the scheduler's autoscaling advice.

Layouts: ``split`` (one process per stage: encode, prefill, decode), ``colocated`` (one process
hosting all three stages) and ``mixed`` (both: the scheduler's adaptive placement takes the
colocated path at low load and spreads bursts over the split workers).

Variants (issue 7): `DeploymentOptions.variants` names several variants of the model served
side by side (``NAME=DIR[:ACCURACY]``, each a whole pipeline); each gets the layout's workers,
started with ``--variant NAME`` (and its own ``--dtype`` from `variant_dtypes`), and the scheduler
gets ``--variants``. With the scheduler's adaptation loop on (``--adapt``), the supervisor's scale
loop acts on the loop's replica targets per (stage, variant): it starts workers up to a target,
and stops (SIGTERM: the worker drains, then exits; never SIGKILL) workers above it or drained.

Used by `prism up`, `prism demo`, the end-to-end tests and the benchmarks.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prism.runtime.procs import Supervisor
from prism.wire import GLIBC_TUNABLES

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

STAGE_SERVICES = {"encode": "prism.v1.EncoderService", "prefill": "prism.v1.PrefillService",
                  "decode": "prism.v1.DecodeService"}
STAGE_MODULES = {"encode": "encoder", "prefill": "prefill", "decode": "decode"}
LAYOUTS = {
    "split": (("encode",), ("prefill",), ("decode",)),
    "colocated": (("encode", "prefill", "decode"),),
    "mixed": (("encode", "prefill", "decode"), ("encode",), ("prefill",), ("decode",)),
}


@dataclass(frozen=True)
class DeploymentOptions:
    model_dir: Path
    dtype: str = "float32"
    device: str = "cpu"
    #: torch threads per worker process (0: torch's default).
    threads: int = 1
    slots: int = 16
    max_len: int = 2048
    host: str = "127.0.0.1"
    #: Fixed scheduler port (0: any free port).
    port: int = 0
    log_dir: Path | None = None
    #: Redis to use; empty starts a redis-server (append-only) in the log directory.
    redis_url: str = ""
    namespace: str = "prism"
    #: split, colocated or mixed (see the module docstring).
    layout: str = "split"
    #: The scheduler's placement policy: adaptive, split or colocated.
    placement: str = "adaptive"
    #: Act on the scheduler's desired replicas (start/stop split workers within the bounds).
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    #: Registry timing: a worker silent for worker_ttl_s is dead (its work fails over).
    heartbeat_s: float = 1.0
    worker_ttl_s: float = 3.0
    #: An accepted request whose scheduler stopped renewing its lease this long is taken over.
    request_lease_s: float = 10.0
    #: Extra arguments per process kind ("scheduler", "encode", "prefill", "decode", "worker").
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    start_timeout_s: float = 180.0
    #: Make a throwaway CA and certificate (in the log directory): mutual TLS between the
    #: processes, TLS at the front door (callers trust ``<log_dir>/tls/ca.pem``).
    tls: bool = False
    #: Variants served side by side, each ``NAME=DIR[:ACCURACY]`` (the scheduler's --variants);
    #: empty: the model of `model_dir` alone. `model_dir` stays the scheduler's default processor.
    variants: tuple[str, ...] = ()
    #: dtype per variant name (e.g. {"bf16": "bfloat16"}); others use `dtype`.
    variant_dtypes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}")
        from services.scheduler.core.variants import parse_variants

        try:
            names = [name for name, _, _ in parse_variants(",".join(self.variants))] if self.variants else []
        except ValueError as exc:
            raise ValueError(f"variants: {exc}") from None
        unknown = sorted(set(self.variant_dtypes) - set(names))
        if unknown:
            raise ValueError(f"variant_dtypes: {unknown} are not variants")

    def variant_dirs(self) -> dict[str, Path]:
        """{variant name: checkpoint directory}; empty without variants."""
        from services.scheduler.core.variants import parse_variants

        return {name: Path(d) for name, d, _ in parse_variants(",".join(self.variants))} if self.variants else {}


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
        self.certs = None
        tls = None
        if options.tls:
            from prism.runtime.tls import ClientTls, make_certs

            self.certs = make_certs(self.log_dir / "tls")
            tls = ClientTls(self.certs.ca, self.certs.cert, self.certs.key)
        self.client_tls = tls
        self.supervisor = Supervisor(self.log_dir, env={"GLIBC_TUNABLES": GLIBC_TUNABLES}, host=options.host,
                                     start_timeout_s=options.start_timeout_s, cwd=REPO_ROOT, tls=tls)
        self.redis = None
        self.redis_url = options.redis_url
        self._seq: dict[str, int] = {}
        #: worker name -> (stages, variant) of every worker this deployment started
        self.started: dict[str, tuple[tuple[str, ...], str]] = {}
        self._scaler: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """The scheduler's (public) address."""
        return self.supervisor["scheduler"].address

    def endpoints(self) -> dict[str, str]:
        return self.supervisor.endpoints()

    def workers(self, stages: tuple[str, ...] | None = None, variant: str | None = None) -> list[str]:
        """Names of the running worker processes (hosting exactly `stages`, of `variant`, when given)."""
        return [n for n, c in self.supervisor.children.items()
                if n != "scheduler" and c.alive() and n in self.started
                and (stages is None or self.started[n][0] == tuple(stages))
                and (variant is None or self.started[n][1] == variant)]

    def _queue_args(self) -> list[str]:
        o = self.options
        return ["--namespace", o.namespace, "--heartbeat-s", str(o.heartbeat_s), "--worker-ttl-s", str(o.worker_ttl_s)]

    def _tls_args(self, *, mutual: bool) -> list[str]:
        if self.certs is None:
            return []
        args = ["--tls-cert", str(self.certs.cert), "--tls-key", str(self.certs.key)]
        return args + ["--tls-ca", str(self.certs.ca)] if mutual else args

    def _queue_env(self, module: str) -> dict[str, str]:
        """The Redis URL goes by the environment, not the command line: it may hold a password."""
        return {f"PRISM_{module.upper()}_REDIS_URL": self.redis_url}

    def start_worker(self, stages: tuple[str, ...], variant: str = "") -> str:
        """Start one worker process hosting `stages` (of `variant`); returns its name (also its
        registry name)."""
        o = self.options
        kind = (f"{variant}." if variant else "") + "+".join(stages)
        with self._lock:
            self._seq[kind] = self._seq.get(kind, 0) + 1
            name = f"{kind}-{self._seq[kind]}"
        model_dir = o.variant_dirs()[variant] if variant else o.model_dir
        dtype = o.variant_dtypes.get(variant, o.dtype)
        model = ["--model-dir", str(model_dir), "--dtype", dtype, "--device", o.device, "--threads", str(o.threads)]
        if variant:
            model += ["--variant", variant]
        self.started[name] = (tuple(stages), variant)
        argv = ["--host", o.host, *model, *self._queue_args(), *self._tls_args(mutual=True), "--worker-name", name]
        if len(stages) == 1:
            stage = stages[0]
            if stage == "decode":
                argv += ["--slots", str(o.slots), "--max-len", str(o.max_len)]
            argv += o.extra_args.get(stage, [])
            self.supervisor.start_service(STAGE_MODULES[stage], argv, name=name, env=self._queue_env(STAGE_MODULES[stage]),
                                          health_service=STAGE_SERVICES[stage])
        else:
            argv += ["--stages", ",".join(stages), "--slots", str(o.slots), "--max-len", str(o.max_len),
                     *o.extra_args.get("worker", [])]
            self.supervisor.start_service("worker", argv, name=name, env=self._queue_env("worker"),
                                          health_service=STAGE_SERVICES[stages[-1]])
        return name

    def start(self) -> "Deployment":
        o = self.options
        try:
            if not self.redis_url:
                from prism.runtime.redisproc import RedisProcess

                import secrets

                # Its own Redis, password-protected: other users of this machine cannot reach the queues.
                self.redis = RedisProcess(self.log_dir / "redis", host=o.host, password=secrets.token_urlsafe(24)).start()
                self.redis_url = self.redis.url
            for variant in o.variant_dirs() or [""]:
                for stages in LAYOUTS[o.layout]:
                    self.start_worker(stages, variant)
            self.start_scheduler()
            self.wait_for_workers(len(self.workers()))
            if o.autoscale or o.variants:  # variants: the adaptation loop's replica targets
                self._scaler = threading.Thread(target=self._scale_loop, name="autoscale", daemon=True)
                self._scaler.start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_scheduler(self, port: int | None = None) -> str:
        """Start the scheduler (again, after `kill`: on `port` to keep its address)."""
        o = self.options
        sched = ["--host", o.host, "--model-dir", str(o.model_dir), "--max-context", str(o.max_len),
                 *self._queue_args(), *self._tls_args(mutual=False), "--placement", o.placement, "--min-replicas", str(o.min_replicas),
                 "--max-replicas", str(o.max_replicas), "--request-lease-s", str(o.request_lease_s),
                 *o.extra_args.get("scheduler", [])]
        if o.variants:
            sched += ["--variants", ",".join(o.variants)]
        if port or o.port:
            sched += ["--port", str(port or o.port)]
        return self.supervisor.start_service("scheduler", sched, env=self._queue_env("scheduler"),
                                             health_service="prism.v1.PrismService").address

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no drain, no deregistration)."""
        import signal

        child = self.supervisor.children[name]
        child.process.send_signal(signal.SIGKILL)
        child.process.wait()

    def status(self, timeout: float = 5.0):
        """The scheduler's admin status (`GetStatusResponse`)."""
        from prism.runtime.tls import sync_channel
        from prism.v1 import admin_pb2, admin_pb2_grpc

        with sync_channel(self.address, self.client_tls) as channel:
            return admin_pb2_grpc.SchedulerAdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest(),
                                                                              timeout=timeout)

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the scheduler sees `count` live workers."""
        until = time.monotonic() + timeout
        while True:
            seen = len(self.status().workers)
            if seen >= count:
                return
            if time.monotonic() > until:
                raise TimeoutError(f"the scheduler sees {seen} of {count} workers after {timeout:.0f}s")
            time.sleep(0.1)

    def scale_variants(self, status) -> dict[str, tuple[int, int]]:
        """The adaptation loop's replica targets per (stage, variant) (`GetStatus.adaptation`):
        start workers up to each target; stop (SIGTERM: finish, then exit) those the scheduler
        drained. Workers above a target, or of a variant left out, are left running until the
        scheduler drains them: it does so only once the variants it keeps have live workers and
        nothing of theirs is queued (a worker stopped here first would leave its queued tasks and
        the variant's traffic with no worker). A whole-pipeline target ("pipeline") counts each
        of the layout's process groups. Returns {"<variant>/<stages>": (before, after)}."""
        o = self.options
        draining = {w.name for w in status.workers if w.draining}
        targets: dict[tuple[tuple[str, ...], str], int] = {}
        for row in status.adaptation.workers:
            groups = LAYOUTS[o.layout] if row.stage == "pipeline" else ((row.stage,),)
            for stages in groups:
                targets[(tuple(stages), row.variant)] = row.replicas
        for stages, variant in set(self.started.values()):  # variants left out of the configuration
            targets.setdefault((stages, variant), 0)
        changes = {}
        for (stages, variant), want in sorted(targets.items()):
            mine = self.workers(stages, variant)
            for name in [n for n in mine if n in draining]:
                self.supervisor.stop(name)  # drained by the scheduler: it exits once its work is done
            active = [n for n in mine if n not in draining]
            before = len(active)
            while len(active) < want and not self._stopping.is_set():
                active.append(self.start_worker(stages, variant))
            if len(active) != before:
                changes[f"{variant}/{'+'.join(stages)}"] = (before, len(active))
        return changes

    def scale_once(self) -> dict[str, tuple[int, int]]:
        """Start or stop single-stage workers so each stage has the scheduler's desired
        replicas (within bounds); with the adaptation loop's targets, those instead
        (`scale_variants`). Returns {stage: (before, after)}."""
        o = self.options
        status = self.status()
        if status.HasField("adaptation") and status.adaptation.changes:
            return self.scale_variants(status)
        if o.variants or not o.autoscale:  # a variant's workers follow the adaptation loop only
            return {}
        changes = {}
        for st in status.stages:
            stage = st.stage
            mine = self.workers((stage,))
            # the registry lags a worker just started (not yet heartbeating) or still draining:
            # our own live processes count too, so the bound holds at every moment
            hosting = max(st.actual_replicas, len(mine))
            want = max(o.min_replicas, min(o.max_replicas, st.desired_replicas))
            before = hosting
            while hosting < want and not self._stopping.is_set():
                self.start_worker((stage,))
                hosting += 1
            while hosting > want and mine:
                self.supervisor.stop(mine.pop())  # SIGTERM: the worker drains, then exits
                hosting -= 1
            if hosting != before:
                changes[stage] = (before, hosting)
        return changes

    def _scale_loop(self) -> None:
        while not self._stopping.wait(1.0):
            try:
                changes = self.scale_once()
                for stage, (a, b) in changes.items():
                    log.info("autoscale %s: %d -> %d workers", stage, a, b)
            except Exception as exc:  # the scheduler may be restarting: try again next round
                log.warning("autoscale round failed: %s", exc)

    def stop(self) -> dict[str, int | None]:
        self._stopping.set()
        if self._scaler is not None:
            self._scaler.join(timeout=30)
        codes = self.supervisor.stop_all()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
        return codes

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
