# Two entry points: `make train` (set-up + demo pretraining) and `make test` (set-up + full suite).
PY := .venv/bin/python
RUNS ?= runs
DATA ?= data

.PHONY: setup train test lint masks bench clean

setup:
	@bash scripts/setup.sh

train: setup
	$(PY) -m pipelines.prepare fashion-mnist --out $(DATA)/fashion-mnist
	$(PY) train.py --config configs/demo.yaml

test: setup lint
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .

masks: setup
	$(PY) -m noise.show --out masks.png

bench: setup
	$(PY) bench/masks.py --json $(RUNS)/bench-masks.json

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
