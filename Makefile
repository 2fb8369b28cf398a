# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCALE ?= small
RUN_DIR ?= runs/demo
LINTED := seminar_ray jobs serve_app bench tests

.PHONY: install run lint test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# The main job end to end on an embedded local Ray (no cluster needed).
run: $(STAMP)
	$(PY) -m jobs.run_all --out $(RUN_DIR) --scale $(SCALE)

# Lint, format and type checks of every Python directory (configured in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# The checks, then the whole suite inside a private network namespace with only loopback when available.
test: lint
	bash scripts/test.sh

# Every benchmark; each writes JSON (and a baseline measured in the same run) to bench/out/.
bench: $(STAMP)
	$(PY) -m bench.data_throughput --out bench/out/data.json
	$(PY) -m bench.model_speed --out bench/out/model.json
	$(PY) -m bench.train_throughput --out bench/out/train.json
	$(PY) -m bench.features --out bench/out/features.json
	$(PY) -m bench.retrieval --out bench/out/retrieval.json --quick
	$(PY) -m bench.serve_load --out bench/out/serve.json --quick
	$(PY) -m bench.fuzz --out bench/out/fuzz.json

clean:
	rm -rf runs .pytest_cache
