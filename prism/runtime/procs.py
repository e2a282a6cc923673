"""Start and stop Prism service processes (`prism up`, e2e tests).

A service started with ``--port 0 --port-file PATH`` binds a free port and, once serving,
writes it to PATH with `write_port_file` (`StageServer` does this when its config has a
``port_file``). The `Supervisor` starts each child in its own session with its output in
``<log_dir>/<name>.log``, waits for the port file and then for grpc health SERVING, exposes
the endpoints, and stops the children with SIGTERM, then SIGKILL after a grace::

    with Supervisor(log_dir, env={"GLIBC_TUNABLES": tunables}, cwd=repo) as sup:
        enc = sup.start_service("encoder", ["--model", str(model_dir)])
        sched = sup.start_service("scheduler", ["--encoders", enc.address, ...])
        run_client(sched.address)
    # children drained and reaped here

The supervisor is synchronous (usable from the typer CLI and from plain pytest fixtures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Child",
    "ChildStartError",
    "Supervisor",
    "read_port_file",
    "wait_for_serving",
    "write_port_file",
]

log = logging.getLogger(__name__)


def write_port_file(path: str | os.PathLike[str], port: int) -> None:
    """Writes `port` (and a newline) to `path` atomically: readers see the whole file or
    none (a temporary file in the same directory, fsynced, then renamed)."""
    if not 0 < port <= 65535:
        raise ValueError(f"not a bound port: {port}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_port_file(path: str | os.PathLike[str]) -> int | None:
    """The port in a port file, or None when the file does not exist (yet)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return int(text.strip())


def wait_for_serving(
    address: str, *, service: str = "", timeout_s: float = 30.0, poll_s: float = 0.05, tls: Any = None
) -> bool:
    """Polls grpc health ``Check(service)`` at `address` until SERVING; False on timeout. `tls`:
    a `prism.runtime.tls.ClientTls` for servers that speak TLS."""
    import grpc  # local: keeps `write_port_file` importable without grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from prism.runtime.tls import sync_channel

    deadline = time.monotonic() + timeout_s
    with sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=min(1.0, remaining))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass  # not listening yet, or the service is not registered yet
            time.sleep(poll_s)


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class ChildStartError(RuntimeError):
    """A child exited, or did not become SERVING in time. Carries its log's tail."""

    def __init__(self, name: str, reason: str, log_path: Path, returncode: int | None) -> None:
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.returncode = returncode
        self.log_tail = _tail(log_path)
        super().__init__(
            f"{name}: {reason} (log {log_path}); last output:\n{self.log_tail or '(none)'}"
        )


@dataclass
class Child:
    """A started, serving child process."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    argv: tuple[str, ...]

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    """Starts service processes and stops them (SIGTERM, then SIGKILL after a grace).

    Args:
        log_dir: where ``<name>.log`` (stdout and stderr) and ``<name>.port`` go.
        env: variables added to every child's environment (e.g. ``GLIBC_TUNABLES``).
        inherit_env: start from this process's environment (default) or an empty one.
        host: host to dial children on.
        start_timeout_s: how long a child may take to write its port and turn SERVING.
        stop_grace_s: how long children get after SIGTERM before SIGKILL.
        cwd: working directory of the children (e.g. the repository root for
            ``python -m services.x``).
        python: interpreter for `start_module`/`start_service`.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        host: str = "127.0.0.1",
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
        cwd: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        tls: Any = None,
    ) -> None:
        self.tls = tls  # ClientTls for the readiness checks of children serving TLS
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._env = dict(env or {})
        self._inherit_env = inherit_env
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._cwd = cwd
        self._python = python
        self._children: dict[str, Child] = {}

    @property
    def children(self) -> dict[str, Child]:
        """Started children by name, in start order."""
        return dict(self._children)

    def endpoints(self) -> dict[str, str]:
        """``{name: "host:port"}`` of the started children."""
        return {name: child.address for name, child in self._children.items()}

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    # ------------------------------------------------------------------ start

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        health_service: str = "",
        timeout_s: float | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Child:
        """Starts ``argv + ["--port-file", <log_dir>/<name>.port]`` and waits until it has
        written its port and reports `health_service` SERVING.

        Raises:
            ValueError: a child with this name is already running.
            ChildStartError: the child exited or timed out (it is killed); the error
                carries the tail of its log.
        """
        if name in self._children and self._children[name].alive():
            raise ValueError(f"a child named {name!r} is running")
        port_file = self.log_dir / f"{name}.port"
        with contextlib.suppress(FileNotFoundError):
            port_file.unlink()
        log_path = self.log_dir / f"{name}.log"
        full_argv = (*argv, "--port-file", str(port_file))
        child_env = dict(os.environ) if self._inherit_env else {}
        child_env.update(self._env)
        child_env.update(env or {})
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log_file:
            log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: "
                           f"{' '.join(full_argv)}\n".encode())
            log_file.flush()
            process = subprocess.Popen(
                full_argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd if cwd is not None else self._cwd,
                start_new_session=True,  # a terminal's Ctrl-C reaches only the supervisor
            )
        log.info("started %s (pid %d)", name, process.pid)
        timeout = self._start_timeout_s if timeout_s is None else timeout_s
        try:
            port = self._wait_ready(name, process, port_file, log_path, health_service, timeout)
        except ChildStartError:
            self._kill(process)
            raise
        child = Child(name=name, process=process, host=self._host, port=port,
                      log_path=log_path, argv=tuple(full_argv))
        self._children[name] = child
        return child

    def start_module(
        self, name: str, module: str, args: Sequence[str] = (), **kwargs: object
    ) -> Child:
        """Starts ``python -m <module> --port 0 <args>`` (see `start` for the keywords)."""
        argv = [self._python, "-m", module, "--port", "0", *args]
        return self.start(name, argv, **kwargs)  # type: ignore[arg-type]

    def start_service(self, stage: str, args: Sequence[str] = (), *, name: str | None = None,
                      **kwargs: object) -> Child:
        """Starts ``python -m services.<stage> --port 0 <args>``, named `name` or `stage`."""
        return self.start_module(name or stage, f"services.{stage}", args, **kwargs)

    def _wait_ready(self, name: str, process: subprocess.Popen[bytes], port_file: Path,
                    log_path: Path, health_service: str, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        port: int | None = None
        while port is None:
            if process.poll() is not None:
                raise ChildStartError(name, f"exited with status {process.returncode} before "
                                      "writing its port file", log_path, process.returncode)
            port = read_port_file(port_file)
            if port is None:
                if time.monotonic() >= deadline:
                    raise ChildStartError(name, f"no port file after {timeout_s:.1f}s",
                                          log_path, None)
                time.sleep(0.05)
        address = f"{self._host}:{port}"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildStartError(name, f"not SERVING on {address} after {timeout_s:.1f}s",
                                      log_path, process.poll())
            if wait_for_serving(address, service=health_service, timeout_s=min(0.5, remaining), tls=self.tls):
                return port
            if process.poll() is not None:
                raise ChildStartError(name, f"exited with status {process.returncode}",
                                      log_path, process.returncode)

    # ------------------------------------------------------------------ stop

    def stop(self, name: str, grace_s: float | None = None) -> int | None:
        """Stops one child (SIGTERM, SIGKILL after the grace); returns its exit status."""
        child = self._children.pop(name)
        return self._terminate([child], grace_s)[name]

    def stop_all(self, grace_s: float | None = None) -> dict[str, int | None]:
        """Sends SIGTERM to every child at once (so they drain in parallel), waits up to the
        grace, SIGKILLs the rest. Returns the exit statuses by name."""
        children = list(reversed(self._children.values()))
        self._children.clear()
        return self._terminate(children, grace_s)

    def _terminate(self, children: Sequence[Child], grace_s: float | None) -> dict[str, int | None]:
        grace = self._stop_grace_s if grace_s is None else grace_s
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        codes: dict[str, int | None] = {}
        for child in children:
            try:
                codes[child.name] = child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit within %.1fs: killing", child.name,
                            child.pid, grace)
                codes[child.name] = self._kill(child.process)
        return codes

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> int:
        """SIGKILLs the child's whole process group (it leads its own session)."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        return process.wait()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()
