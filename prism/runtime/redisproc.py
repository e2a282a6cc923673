"""A local `redis-server` as a child process: what `prism up` starts when no ``--redis-url`` is
given, and what the tests start on a free loopback port. Append-only persistence is on, so a
restarted server (same directory, same port) comes back with every accepted request."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["RedisProcess", "RedisUnavailable", "free_port"]


class RedisUnavailable(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisProcess:
    """One redis-server bound to `host`:`port` (a free port when 0) with its data in `data_dir`.

    Args:
        data_dir: working directory: the append-only file and the log live here.
        port: TCP port; 0 picks a free one (kept across `restart`).
        appendonly: AOF persistence (``appendfsync everysec``, Debian's default policy).
        executable: the server binary; found on PATH when None.
    """

    def __init__(self, data_dir: str | os.PathLike, *, port: int = 0, host: str = "127.0.0.1",
                 appendonly: bool = True, executable: str | None = None, password: str | None = None):
        # absolute: redis-server changes into --dir before it opens a relative --logfile
        self.data_dir = Path(data_dir).resolve()
        self.password = password  # clients must AUTH (it is in `url`)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.executable = executable or shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> "RedisProcess":
        if self.executable is None:
            raise RedisUnavailable("redis-server not found: install Debian's redis-server "
                                   "(apt-get install redis-server) or pass --redis-url")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.executable, "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--save", "", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc is not None and self.proc.poll() is not None:
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}; "
                                       f"see {self.data_dir / 'redis.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if self.password:  # RESP, so any byte of the password is safe
                        pw = self.password.encode()
                        s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                        if not s.recv(64).startswith(b"+OK"):
                            raise RedisUnavailable("redis-server refused its own password")
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
                    # "-LOADING ..." while it replays the AOF: keep waiting.
            except OSError:
                pass
            time.sleep(0.05)
        raise RedisUnavailable(f"redis-server on {self.host}:{self.port} not ready after {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis flushes the AOF and exits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (writes of the last second may be lost with everysec)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
