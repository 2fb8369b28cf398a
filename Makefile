# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCALE ?= small
RUN_DIR ?= runs/demo

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# The main job end to end on an embedded local Ray (no cluster needed).
run: $(STAMP)
	$(PY) jobs/run_all.py --out $(RUN_DIR) --scale $(SCALE)

# The whole suite, inside a private network namespace with only loopback when available.
test: $(STAMP)
	bash scripts/test.sh

# Every benchmark; each writes JSON (and a baseline measured in the same run) to bench/out/.
bench: $(STAMP)
	$(PY) bench/data_throughput.py --out bench/out/data.json
	$(PY) bench/model_speed.py --out bench/out/model.json
	$(PY) bench/train_throughput.py --out bench/out/train.json
	$(PY) bench/features.py --out bench/out/features.json
	$(PY) bench/retrieval.py --out bench/out/retrieval.json --quick
	$(PY) bench/serve_load.py --out bench/out/serve.json --quick
	$(PY) bench/fuzz.py --out bench/out/fuzz.json

clean:
	rm -rf runs .pytest_cache
