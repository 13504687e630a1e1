# Trainyard. `make demo` on a fresh machine: venv, pinned deps, local stack, deployments, a training run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TRAINYARD_HOME ?= $(CURDIR)/.trainyard
# The stack's client settings (API URLs, offline switches) for every command below.
STACK_ENV = set -a && eval "$$($(PY) -m infra.stack env)" && set +a
# Several hosts (docs/scale-out.md): `make up ROLE=control` on the control host; on a training host
# `make up ROLE=worker POOL=gpu-host-0 LIMIT=1`. TRAINYARD_DATABASE_URL and TRAINYARD_ARTIFACT_STORE switch to
# PostgreSQL and S3; without them everything stays in $(TRAINYARD_HOME) (SQLite and local files).
ROLE ?= all
UP_ARGS = --role $(ROLE) $(if $(POOL),--pool $(POOL)) $(if $(LIMIT),--limit $(LIMIT))

.PHONY: help venv s3rver up down status deploy datasets demo test lint format bench lock clean

help:
	@echo "make demo      venv + stack + deployments + one demo training run, then prints the links"
	@echo "make test      the whole test suite (starts its own servers on free ports)"
	@echo "make up/down   start/stop the local stack (Prefect server, MLflow server, worker)"
	@echo "               ROLE=control: servers only; ROLE=worker POOL=...: a training host (docs/scale-out.md)"
	@echo "make deploy    seed compute profiles, apply their pools, and apply prefect.yaml to the running stack"
	@echo "make bench     the benchmarks in bench/ (see docs/benchmarks.md)"

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

up: venv
	$(PY) -m infra.stack up $(UP_ARGS)

down:
	@if [ -x $(PY) ]; then $(PY) -m infra.stack down; fi

status: venv
	$(PY) -m infra.stack status --role $(ROLE)

deploy: up
	$(STACK_ENV) && $(PY) -m infra.compute.profiles seed --if-empty && $(PY) -m infra.stack.apply
	$(STACK_ENV) && $(VENV)/bin/prefect --no-prompt deploy --all

datasets: venv
	$(PY) -m trainers.data.synthetic $(TRAINYARD_HOME)/datasets

DEMO ?= train/torch-shapes
demo: deploy datasets
	$(STACK_ENV) && $(PY) -m deployments.demo $(DEMO)

# The storage tests also run on s3rver, a Node.js S3 server pinned in tests/s3rver (package-lock.json). Without npm,
# or if the install fails, those cases skip and say why.
S3RVER := tests/s3rver
s3rver: $(S3RVER)/node_modules/.package-lock.json
$(S3RVER)/node_modules/.package-lock.json: $(S3RVER)/package.json $(S3RVER)/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then echo "npm not found: the storage tests' s3rver cases will skip"; \
	else cd $(S3RVER) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
	  || echo "npm ci failed in $(S3RVER): the storage tests' s3rver cases will skip"; fi

# TEST_WORKERS=N: N pytest-xdist workers, each with its own servers and PostgreSQL cluster, a test file per worker
# (tests/conftest.py groups them; the two memory-hungry files never at once). Off by default: on a 2-core, 24 GiB
# machine two workers ran out of memory when test_scale.py and the network-host tests overlapped.
TEST_WORKERS ?= 0
test: venv s3rver
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Every script in bench/ (bench/_common.py is their shared code, not a bench), one after the other, each with the
# stack's environment, against the running stack: `make up` first. The deployments are applied first (`make deploy`,
# which reuses the running stack). `exec`: a SIGTERM to make reaches the bench, which stops what it started.
BENCHES = $(filter-out bench/_%,$(sort $(wildcard bench/*.py)))
define bench_script
	$(STACK_ENV) && exec $(PY) $(1)

endef
bench: venv
	@$(PY) -m infra.stack status > /dev/null || { echo "run \`make up\` first (\`make status\` shows what is down)"; exit 1; }
	@$(MAKE) --no-print-directory deploy
	$(foreach script,$(BENCHES),$(call bench_script,$(script)))

# Re-pin after changing pyproject.toml: the lock is what a fresh machine installs.
lock:
	$(VENV)/bin/pip freeze --exclude-editable --disable-pip-version-check > constraints.txt

clean: down
	rm -rf $(TRAINYARD_HOME)
