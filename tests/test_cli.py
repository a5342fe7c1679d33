"""The command line as scripts use it: `specmesh generate` (in-process and --target) and `specmesh up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from specmesh.local_cluster import free_port, wait_serving
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
PROMPT = "w5 w9 w12 w5 w9"


def specmesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specmesh.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "model", vocab_size=64, hidden=32, layers=2, seed=3)


def test_generate_prints_only_text_and_is_the_same_with_any_drafter(model_dir):
    plain = specmesh("generate", "--verifier", str(model_dir), "--drafter", "none", "--raw", "--max-tokens", "12",
                     PROMPT)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip(), "no text on stdout"
    assert "[specmesh]" not in plain.stdout
    for drafter, extra in (("prompt-lookup", []), ("layers:1", []), (str(model_dir), []),
                           (str(model_dir), ["--no-context-copy"])):
        other = specmesh("generate", "--verifier", str(model_dir), "--drafter", drafter, "--raw", "--max-tokens",
                         "12", "--stats", *extra, PROMPT)
        assert other.returncode == 0, other.stderr
        assert other.stdout == plain.stdout, drafter
        assert "[specmesh]" in other.stderr


@pytest.mark.parametrize("dtype, policy", [("float32", "fixed"), ("bfloat16", "fixed"), ("bfloat16", "adaptive")])
def test_generate_in_either_precision_is_the_same_with_and_without_drafting(model_dir, dtype, policy):
    """bfloat16 on CPU is exact too (the runner's batch-invariant layout), and so is the adaptive
    policy in-process (the default of `generate`)."""
    outputs = set()
    for drafter in ("none", str(model_dir)):
        result = specmesh("generate", "--verifier", str(model_dir), "--drafter", drafter, "--dtype", dtype, "--raw",
                          "--policy", policy, "--max-tokens", "12", "--stats", PROMPT)
        assert result.returncode == 0, result.stderr
        assert dtype in result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1
    bad = specmesh("generate", "--verifier", str(model_dir), "--dtype", "float64", PROMPT)
    assert bad.returncode == 2 and "--dtype must be auto or one of" in bad.stderr
    bad = specmesh("generate", "--verifier", str(model_dir), "--policy", "greedy", PROMPT)
    assert bad.returncode == 2 and "--policy must be 'adaptive' or 'fixed'" in bad.stderr


def test_generate_reports_bad_input_clearly(model_dir):
    result = specmesh("generate", "--verifier", str(model_dir), "--top-p", "2", PROMPT)
    assert result.returncode == 2 and "top_p" in result.stderr and result.stdout == ""
    result = specmesh("generate", "--verifier", "no-such-model-anywhere", PROMPT)
    assert result.returncode == 2 and "no-such-model-anywhere" in result.stderr


def test_up_serves_generate_target_and_stops_cleanly_on_sigint(model_dir, tmp_path):
    port, http_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "specmesh.cli", "up", "--verifier", str(model_dir), "--drafter",
                           str(model_dir), "--port", str(port), "--http-port", str(http_port),
                           "--log-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        wait_serving(f"127.0.0.1:{port}", 120, up)
        remote = specmesh("generate", "--target", f"127.0.0.1:{port}", "--raw", "--max-tokens", "12", PROMPT)
        local = specmesh("generate", "--verifier", str(model_dir), "--drafter", "none", "--raw", "--max-tokens",
                         "12", PROMPT)
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        # The same cluster answers OpenAI-style HTTP.
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                           json={"model": str(model_dir), "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip() == local.stdout.strip()
        up.send_signal(signal.SIGINT)
        stdout, _ = up.communicate(timeout=60)
        assert up.returncode == 0
        assert f"127.0.0.1:{port}" in stdout
        time.sleep(0.5)
        leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
        assert leftover.stdout.strip() == "", "service processes outlived specmesh up"
    finally:
        if up.poll() is None:
            up.kill()


def test_bench_measures_modes_baselines_and_ceiling(model_dir, tmp_path):
    workload = tmp_path / "workload.jsonl"
    workload.write_text('{"prompt": "w5 w9 w12 w5 w9"}\n{"messages": [{"role": "user", "content": "w7 w8"}]}\n')
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = specmesh("bench", "--verifier", str(model_dir), "--drafter", str(model_dir), "--workload",
                      str(workload), "--concurrency", "1,2", "--max-tokens", "8", "--requests", "2",
                      "--baseline", "hf", "--plot", str(out_png), "--json", str(out_json), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out_json.read_text())
    modes = {(r["mode"], r["concurrency"]) for r in report["results"]}
    assert {("off", 1), ("on", 1), ("off", 2), ("on", 2), ("hf-generate", 1), ("hf-assisted", 1)} <= modes
    on = next(r for r in report["results"] if r["mode"] == "on" and r["concurrency"] == 1)
    # The drafter is the verifier itself: everything drafted is accepted, and the ceiling is
    # (γ + 1) / (γc + 1) for the measured γ and cost ratio c (near 1 here, either side of it:
    # whether the ceiling is above 1 is up to timing noise, so the formula is what is checked).
    assert on["acceptance_rate"] == 1.0 and on["tau"] > 1.0
    gamma, c = on["mean_draft_length"], report["meta"]["cost_ratio"]
    assert c > 0 and on["analytic_ceiling"] == pytest.approx((gamma + 1) / (gamma * c + 1))
    # Greedy: every request's output with speculation is the same as without.
    assert on["outputs_compared"] == 2 and on["outputs_identical"] == 2
    assert out_png.stat().st_size > 10_000
    assert "ceiling" in result.stdout and "hf-assisted" in result.stdout
