"""`specmesh up`: the whole system on this machine, one `specmesh serve <service>` process each.

Start order follows the dependencies (verifier and drafter, then scheduler, then gateway); each
process is waited for until its grpc.health.v1 reports SERVING. On SIGINT/SIGTERM every child
gets SIGTERM (graceful stop), then SIGKILL after a grace period. Children also die with us
(PR_SET_PDEATHSIG on Linux), so an abrupt end leaves no orphans holding ports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.errors import SpecmeshError

LOOPBACK = "127.0.0.1"


class ClusterStartError(SpecmeshError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 at address until SERVING (or the process exits, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ClusterStartError(f"process for {address} exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ClusterStartError(f"{address} did not become SERVING within {timeout_s:.0f} s")


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen


def verifier_threads(cores: int | None = None) -> int:
    """Compute threads for the verifier of a local cluster: every core but one."""
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    return max(1, cores - 1)


@dataclass
class LocalCluster:
    verifier: str
    drafter: str
    port: int = 50051
    draft_length: int = 4
    policy: str = "adaptive"
    redis_url: str | None = None
    http_port: int | None = None
    api_keys_file: str | None = None
    start_timeout_s: float = 600.0
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Every service appends its spans (OTLP JSON lines) here; `specmesh tune` reads it.
    trace_file: Path | None = None
    services: list[ServiceProcess] = field(default_factory=list)

    @property
    def gateway_address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _spawn(self, name: str, port: int, args: list[str]) -> ServiceProcess:
        command = [sys.executable, "-m", "specmesh.cli", "serve", name, "--host", LOOPBACK, "--port", str(port), *args]
        env = {**os.environ, **self.extra_env}
        if self.trace_file is not None:
            env["SPECMESH_TRACE_FILE"] = str(Path(self.trace_file).resolve())
        # Idle OpenMP workers must sleep, not spin: four processes share these cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # On one machine the verifier's forward pass is the bottleneck: the other services get one
        # compute thread each so their thread pools do not steal its cores, and the verifier gets
        # every core but one, which the other three share. Giving it all of them oversubscribed a
        # 2-core machine: one verifier thread served 29.4 tokens/s against 25.3 at concurrency 1
        # and 126 against 101 at 8 (bfloat16; float32 forwards of 2-8 tokens 20-25% cheaper).
        env.setdefault("OMP_NUM_THREADS", str(verifier_threads()) if name == "verifier" else "1")
        stdout = stderr = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{name}.log", "ab")
            stdout = stderr
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, preexec_fn=_die_with_parent)
        service = ServiceProcess(name, f"{LOOPBACK}:{port}", process)
        self.services.append(service)
        return service

    def start(self) -> None:
        try:
            verifier = self._spawn("verifier", free_port(), ["--model", self.verifier])
            drafter = None
            if self.drafter.lower() not in ("none", "off", ""):
                drafter = self._spawn("drafter", free_port(), ["--model", self.drafter, "--verifier-model", self.verifier])
            wait_serving(verifier.address, self.start_timeout_s, verifier.process)
            if drafter is not None:
                wait_serving(drafter.address, self.start_timeout_s, drafter.process)
            scheduler_args = ["--verifiers", verifier.address, "--draft-length", str(self.draft_length),
                              "--policy", self.policy]
            if self.redis_url:
                scheduler_args += ["--redis-url", self.redis_url]
            if drafter is not None:
                scheduler_args += ["--drafters", drafter.address]
            scheduler = self._spawn("scheduler", free_port(), scheduler_args)
            wait_serving(scheduler.address, self.start_timeout_s, scheduler.process)
            gateway_args = ["--model", self.verifier, "--scheduler", scheduler.address]
            if self.http_port:
                gateway_args += ["--http-port", str(self.http_port)]
            if self.api_keys_file:
                gateway_args += ["--api-keys-file", self.api_keys_file]
            if self.redis_url:
                gateway_args += ["--redis-url", self.redis_url]
            gateway = self._spawn("gateway", self.port, gateway_args)
            wait_serving(gateway.address, self.start_timeout_s, gateway.process)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        # Front door first, so no new work arrives while the back ends drain.
        for service in reversed(self.services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in reversed(self.services):
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                service.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        self.services.clear()

    def wait(self) -> int:
        """Block until a signal arrives or a child dies; returns the exit code for `up`."""
        stop = {"signal": None}

        def handler(signum, _frame):
            stop["signal"] = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while stop["signal"] is None:
                for service in self.services:
                    if service.process.poll() is not None:
                        print(f"specmesh up: {service.name} exited with code {service.process.returncode}",
                              file=sys.stderr)
                        return 1
                time.sleep(0.3)
            return 0
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
