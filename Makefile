# The README's commands. `make demo` and `make test` are the whole set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# RUNTIME: chargpt and what it runs on (the demo's install); STAMP: and the test and lint tools (make test's)
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
# torch first, pinned: here that is the CPU wheel on disk; pyproject asks only torch>=2.4 for users.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(RUNTIME): pyproject.toml
	@echo "== installing into $(VENV): PyTorch for the CPU (~200 MB), then chargpt with its server (FastAPI, prometheus-client)"
	@echo "== 1.5-4 minutes the first time, seconds after that"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[serve]"
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	@echo "== installing the test tools into $(VENV) (pytest, selenium, schemathesis, onnx, openai, lm-eval, ruff)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# ~3 minutes on a 2-core laptop: 150 s of training (evaluations included), then a sample.
# A second `make demo` keeps the model in out/demo (it may have been trained further since): it only samples.
demo: $(RUNTIME)
	@if [ -e out/demo/model.safetensors ]; then \
	    echo "== out/demo already holds a model: sampling from it (rm -r out/demo first to train a new one)"; \
	else \
	    echo "== make demo: train a GPT sized for 150 s of this machine on the complete Shakespeare plays"; \
	    echo "== for 150 seconds on this machine, then let it write 600 characters. Everything lands in out/demo/."; \
	    $(VENV)/bin/chargpt train --out out/demo --max-time 150; \
	fi
	@echo "== A sample from out/demo (temperature 0.8):"
	$(VENV)/bin/chargpt sample --model out/demo --prompt "ROMEO:" --max-new-tokens 600 --temperature 0.8 --seed 0
	@echo "== That was 150 s on a CPU. Next: out/demo/loss.png shows the run; $(VENV)/bin/chargpt info out/demo"
	@echo "== describes it. A better model: train 750 s more ($(VENV)/bin/chargpt train --resume out/demo --add-time 750),"
	@echo "== or the classic 10.8M-parameter model on a GPU ($(VENV)/bin/chargpt train --preset seed --out out/seed)."

# two workers, a test file each at a time (a file's fixtures, such as its server, stay in one process), the files
# with end_to_end tests first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order); the 15
# slowest tests are listed at the end, so a test that grows slow is seen
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

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
	$(PY) benchmarks/bench_contention.py
	$(PY) benchmarks/bench_budget.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_averaging.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_web.py
	$(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
