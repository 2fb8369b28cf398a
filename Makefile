# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCALE ?= small
RUN_DIR ?= runs/demo
LINTED := seminar_ray jobs serve_app bench tests

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

# Lint, format and type checks of every Python directory (configured in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# The checks, then the whole suite inside a private network namespace with only loopback when available.
test: lint redis-server
	bash scripts/test.sh

# Every benchmark; each writes JSON (and a baseline measured in the same run) to bench/out/.
bench: $(STAMP) redis-server
	$(PY) -m bench.data_throughput --out bench/out/data.json
	$(PY) -m bench.model_speed --out bench/out/model.json
	$(PY) -m bench.train_throughput --out bench/out/train.json
	$(PY) -m bench.features --out bench/out/features.json
	$(PY) -m bench.retrieval --out bench/out/retrieval.json --quick
	$(PY) -m bench.serve_load --out bench/out/serve.json --quick
	$(PY) -m bench.history_store --out bench/out/history_store.json --quick
	$(PY) -m bench.fuzz --out bench/out/fuzz.json

clean:
	rm -rf runs .pytest_cache
