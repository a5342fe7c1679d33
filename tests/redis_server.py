"""A real redis-server on a free loopback port, for tests.

Import the fixtures into a test module explicitly:

    from tests.redis_server import redis_process, redis_server  # noqa: F401

`redis_server` yields the URL (redis://127.0.0.1:PORT/0); `redis_process` yields the
controllable `RedisProcess` (kill / start again on the same port / pause / resume) for outage
tests. Both stop the server at the end of the test. Tests are skipped when redis-server is not
installed (scripts/bootstrap.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait_s: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}/redis.log")
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {wait_s} s")

    def kill(self) -> None:
        """Hard stop (SIGKILL): what a crashed or evicted Redis pod looks like."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing (a slow/hung Redis)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisProcess(executable, directory)
    for attempt in range(3):  # the free port may be taken between probing and binding
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = _free_port()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            try:
                os.kill(server.process.pid, signal.SIGCONT)  # a paused server cannot die cleanly
            except ProcessLookupError:
                pass
        server.kill()


@pytest.fixture
def redis_server(redis_process: RedisProcess) -> str:
    return redis_process.url
