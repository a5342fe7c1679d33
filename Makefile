# The two quick-start commands: `make run` and `make test`. Each bootstraps .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a haiku about distributed systems.
PORT ?= 50051

.PHONY: venv run generate test proto proto-check

venv:
	bash scripts/bootstrap.sh

# The whole system on this machine: gateway, scheduler, drafter, verifier as separate processes.
run: venv
	$(VENV)/bin/specmesh up --port $(PORT)

# One prompt in-process (no services).
generate: venv
	$(VENV)/bin/specmesh generate --stats --max-tokens 64 "$(PROMPT)"

proto: venv
	$(PY) -m specmesh.protogen

proto-check: venv
	$(PY) -m specmesh.protogen --check

test: venv proto-check
	$(PY) -m pytest -q -x --durations=15
