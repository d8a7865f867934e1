# Two entry points: `make train` (set-up + demo pretraining) and `make test` (set-up + full suite).
PY := .venv/bin/python
RUNS ?= runs
DATA ?= data

.PHONY: setup setup-gpu setup-test train test lint masks bench bench-masks bench-loaders bench-train gpu-check \
	gpu-wheels gpu-rehearsal reproduce compare clean

# Each command installs what it needs (scripts/setup.sh names the Debian packages when not root).
setup:
	@bash scripts/setup.sh train

setup-gpu:  # + DALI, CuPy and FFCV
	@bash scripts/setup.sh gpu

setup-test:  # + the test tools, PostgreSQL, Docker, debootstrap, Chromium
	@bash scripts/setup.sh test

train: setup
	$(PY) -m pipelines.prepare fashion-mnist --out $(DATA)/fashion-mnist
	$(PY) train.py --config configs/demo.yaml

test: setup-test lint
	@# a bound on the whole suite (~17 min on 2 cores with a warm Docker cache), in case a process hangs
	timeout --kill-after=30 3600 $(PY) -m pytest -q

lint: setup-test
	.venv/bin/ruff check .

masks: setup
	$(PY) -m noise.show --out $(RUNS)/masks.png

bench: bench-masks bench-loaders bench-train

bench-masks: setup
	$(PY) -m bench.masks --json $(RUNS)/bench/masks.json

bench-loaders: setup
	$(PY) -m bench.loaders --json $(RUNS)/bench/loaders.json

bench-train: setup
	$(PY) -m bench.train_step --json $(RUNS)/bench/train_step.json

# On a GPU node, with whatever Python environment is active (no set-up, nothing fetched):
#   make gpu-check ARGS="--write-docs --wheels gpu-wheels"      (the CPU twin: ARGS=--smoke)
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(ARGS)

# What travels to a bare GPU image: omegaconf's wheel, for Python 3.12 (pure Python), in gpu-wheels/.
gpu-wheels:
	@bash scripts/gpu_rehearsal.sh wheels

# The GPU check's CPU twin in a virtual environment of exactly a bare GPU image's packages
# (requirements-gpu-image.txt; built once, cached in ~/.cache/colormae), with gpu-wheels/.
gpu-rehearsal:
	@bash scripts/gpu_rehearsal.sh

reproduce: setup
	$(PY) -m eval.reproduce --quick --out $(RUNS)/reproduce-quick.md --json $(RUNS)/reproduce-quick.json

compare: setup
	$(PY) -m eval.compare --experiment colormae-demo --out $(RUNS)/compare

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
