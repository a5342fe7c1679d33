# The two quick-start commands: `make run` and `make test`. Each bootstraps .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a haiku about distributed systems.

.PHONY: venv run test proto proto-check

venv:
	bash scripts/bootstrap.sh

run: venv
	$(VENV)/bin/specmesh generate --max-tokens 64 "$(PROMPT)"

proto: venv
	$(PY) -m specmesh.protogen

proto-check: venv
	$(PY) -m specmesh.protogen --check

test: venv proto-check
	$(PY) -m pytest -q -x --durations=15
