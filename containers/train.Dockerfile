# QLoRA training on CUDA: bitsandbytes NF4, peft, trl, and Unsloth as the fast backend.
# Build from the repository root:  docker build -f containers/train.Dockerfile -t ghcr.io/qloraflow/train-cuda:0.1.0 .
# torch 2.11 from PyPI brings its CUDA 13 libraries (nvidia-* wheels); the node needs a driver >= 580.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /root

# The CUDA training lock (every package exact, `make lock`) carries Unsloth with its own pins.
COPY requirements/train-cuda.lock /tmp/train-cuda.lock
RUN pip install --no-deps -r /tmp/train-cuda.lock

COPY pyproject.toml README.md ./
COPY qloraflow ./qloraflow
COPY tasks ./tasks
COPY workflows ./workflows
RUN pip install --no-deps -e .
