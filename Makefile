# uio — one-command set-up and tests. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-all test-slow toyworld train-tiny lint bench clean

install:  ## create .venv and install uio (editable) with its test extras
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23" wheel
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PY) -c "import uio, torch, lightning, hydra, webdataset, sentencepiece; print('uio', uio.__version__, 'torch', torch.__version__)"

test:  ## the default (fast) suite, as CI runs it
	$(PY) -m pytest -q -m "not slow and not gpu" -n 2 --dist loadgroup

test-all:  ## everything except GPU tests, including slow end-to-end runs
	$(PY) -m pytest -q -m "not gpu" -n 2 --dist loadgroup

toyworld:  ## build the embedded default dataset (toy-world shards under $$UIO_HOME/toyworld) and draw a sample grid
	$(PY) -m uio.data.toyworld build && $(PY) -m uio.data.toyworld show --out toyworld_grid.png

train-tiny:  ## train the tiny model on the toy world (<= 15 min on 2 CPU cores; builds what is missing first, once: ~12 min)
	$(VENV)/bin/uio-train +experiment=tiny_multitask

bench:  ## CPU benchmarks against Hugging Face T5 (a few minutes)
	$(PY) bench/train_step.py && $(PY) bench/generate.py && $(PY) bench/data_loading.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
