# The README's commands. `make demo` and `make test` are the whole set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, pinned: here that is the CPU wheel on disk; pyproject asks only torch>=2.4 for users.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/chargpt train --out out/demo --overwrite --max-time 150
	$(VENV)/bin/chargpt sample --model out/demo --max-new-tokens 600 --temperature 0.8 --seed 0

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: install
	$(PY) benchmarks/bench_tokenizer.py
	$(PY) benchmarks/bench_corpus.py
	$(PY) benchmarks/bench_sample.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
