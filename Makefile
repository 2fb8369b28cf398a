# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCALE ?= small
RUN_DIR ?= runs/demo

.PHONY: install redis-server run lint test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

# redis-server (and redis-benchmark) for the Redis history store's tests and bench: Debian's package, as root.
# Found on PATH: nothing to do. Not installable here: say so and stop, so `make test` never passes without it.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing and only root can apt-get install it: install Debian's redis-server" \
	         "(or put one on PATH); the history-store tests need it" >&2; exit 1; \
	  fi; }
	@redis-server --version

install: $(STAMP) redis-server

# The main job end to end on an embedded local Ray (no cluster needed).
run: $(STAMP)
	$(PY) -m jobs.run_all --out $(RUN_DIR) --scale $(SCALE)

# Lint, format and type checks of the library and the jobs (configured in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check seminar_ray jobs
	$(PY) -m ruff format --check seminar_ray jobs
	$(PY) -m mypy

# The checks, then the whole suite inside a private network namespace with only loopback when available.
test: lint redis-server
	bash scripts/test.sh

# Every benchmark; each writes JSON (and a baseline measured in the same run) to bench/out/.
bench: $(STAMP) redis-server
	$(PY) bench/data_throughput.py --out bench/out/data.json
	$(PY) bench/model_speed.py --out bench/out/model.json
	$(PY) bench/train_throughput.py --out bench/out/train.json
	$(PY) bench/features.py --out bench/out/features.json
	$(PY) bench/retrieval.py --out bench/out/retrieval.json --quick
	$(PY) bench/serve_load.py --out bench/out/serve.json --quick
	$(PY) bench/history_store.py --out bench/out/history_store.json --quick
	$(PY) bench/fuzz.py --out bench/out/fuzz.json

clean:
	rm -rf runs .pytest_cache
