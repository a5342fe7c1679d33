"""Helpers for end-to-end tests: services in this process or as real `specmesh serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from specmesh.local_cluster import free_port, wait_serving

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServiceProcesses:
    """Real service processes; every one is SIGKILLed at the end, whatever happened."""

    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def spawn(self, name: str, service: str, *args: str, log_dir: Path) -> str:
        port = free_port()
        command = [sys.executable, "-m", "specmesh.cli", "serve", service, "--host", "127.0.0.1",
                   "--port", str(port), *args]
        log = open(log_dir / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=REPO)
        self.addresses[name] = f"127.0.0.1:{port}"
        return self.addresses[name]

    def wait_all(self, timeout_s: float = 120.0) -> None:
        for name, address in self.addresses.items():
            wait_serving(address, timeout_s, self.processes[name])

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
