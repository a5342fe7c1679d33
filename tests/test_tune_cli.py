"""`specmesh up --trace-file` then `specmesh tune`: four real service processes write one trace
file together, and tune turns it into a report and a plot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from specmesh.local_cluster import free_port, wait_serving
from specmesh.otlp_json import read_spans
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
SERVICES = {"specmesh-gateway", "specmesh-scheduler", "specmesh-drafter", "specmesh-verifier"}


def specmesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specmesh.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def test_up_trace_file_is_read_by_tune(tmp_path):
    model = save_tiny_model(tmp_path / "model", vocab_size=64, hidden=32, layers=2, seed=3)
    traces = tmp_path / "traces.jsonl"
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "specmesh.cli", "up", "--verifier", str(model), "--drafter",
                           "layers:1", "--port", str(port), "--trace-file", str(traces),
                           "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        try:
            wait_serving(f"127.0.0.1:{port}", 120, up)
        except Exception:
            up.kill()
            raise AssertionError(f"specmesh up did not start: {up.communicate()[1][-3000:]}") from None
        prompts = ["w5 w9 w12 w5 w9", "w7 w8 w7 w8 w7 w8"]
        clients = [subprocess.Popen([sys.executable, "-m", "specmesh.cli", "generate", "--target",
                                     f"127.0.0.1:{port}", "--raw", "--max-tokens", "16", prompt],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
                   for prompt in prompts]
        for client in clients:
            _, stderr = client.communicate(timeout=120)
            assert client.returncode == 0, stderr
        up.send_signal(signal.SIGINT)
        up.communicate(timeout=60)
        assert up.returncode == 0
    finally:
        if up.poll() is None:
            up.kill()

    spans = list(read_spans(traces))  # every service flushed its spans on the way out
    services_by_trace: dict[str, set[str]] = defaultdict(set)
    for span in spans:
        services_by_trace[span.trace_id].add(span.service)
    requests = [s for s in spans if s.name == "specmesh.gateway.request"]
    assert len(requests) == len(prompts)
    # Each request's trace spans gateway, scheduler and drafter; the verifier's spans join the
    # trace of the batch's first session and link every session's round span.
    for request in requests:
        assert services_by_trace[request.trace_id] >= SERVICES - {"specmesh-verifier"}
    assert any(services_by_trace[request.trace_id] == SERVICES for request in requests)
    linked = {link.span_id for s in spans if s.name == "specmesh.verifier.batch" for link in s.links}
    rounds = {s.span_id for s in spans if s.name == "specmesh.scheduler.round"}
    assert rounds and rounds <= linked

    png = tmp_path / "tune.png"
    result = specmesh("tune", str(tmp_path), "--plot", str(png))  # a directory of trace files works too
    assert result.returncode == 0, result.stderr
    assert "Acceptance by position" in result.stdout and "Recommended settings" in result.stdout
    assert png.stat().st_size > 10_000
