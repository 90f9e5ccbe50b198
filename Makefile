# One front door for developer tasks. Every target sets up its own virtualenv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The suite runs on this many pytest-xdist workers, one test file per worker at a time
# (a file's fixtures and servers stay in one process). Most tests wait on servers they
# start, so two workers halve the suite's time on two cores. WORKERS=0: one process.
WORKERS ?= 2

.PHONY: run test lint bench bench-peers bench-memory check-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/budget-sidecar serve $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check sidecar tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check sidecar tests bench
	$(PY) -m ruff format --check sidecar tests bench || true
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

# The sidecar next to Node's rate-limiter-flexible + ioredis in the same run (bench/peers).
# Needs node and npm; not part of `make test` or CI.
bench-peers: $(STAMP)
	@command -v node >/dev/null 2>&1 || { echo "bench-peers needs node and npm (apt-get install nodejs npm)" >&2; exit 1; }
	@test -d bench/peers/node_modules || (cd bench/peers && npm ci --no-audit --no-fund)
	$(PY) -m bench.peers.run $(ARGS)

# Bytes of Redis per entity, per reservation, per ledger record (bench/memory.py).
bench-memory: $(STAMP)
	$(PY) -m bench.memory $(ARGS)

check-config: $(STAMP)
	$(VENV)/bin/budget-sidecar check-config $(FILE)

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache
