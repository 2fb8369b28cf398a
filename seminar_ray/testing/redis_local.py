"""A private redis-server on 127.0.0.1 for the tests, the bench and `make run`-sized trials: one way to start one.

`make install` installs redis-server (Debian's package). The server gets a free port, its own directory for the
AOF and its log, `appendonly yes` + `appendfsync always` (what RedisHistoryStore demands), no RDB snapshots, and
listens on loopback only. `kill()` is a SIGKILL (a crash); `start()` again replays the AOF on the same port.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

INSTALL_HINT = "`make install` installs it (Debian: apt-get install -y redis-server)"


def redis_binary(name: str = "redis-server") -> str:
    """The path of a Redis program, or an error that says how to install it."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """redis-server as a child process; a context manager that always stops it."""

    def __init__(self, directory: str | Path, port: int | None = None, appendfsync: str = "always"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> LocalRedis:
        """Start (or restart after kill/stop) and wait until it answers PING, AOF replayed."""
        args = [
            redis_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.TimeoutError) as e:  # BusyLoadingError while replaying the AOF
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not start: {e}; log: {self.log_tail()}"
                    ) from e
            finally:
                client.close()
            time.sleep(0.05)

    def log_tail(self, lines: int = 5) -> str:
        path = self.dir / "redis.log"
        return " | ".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL: what a crash does (acknowledged writes must already be in the AOF)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
