# Data, tokenize, evaluate-on-CPU and registry steps: slim Python, CPU torch, no CUDA.
# Build from the repository root:  docker build -f containers/data.Dockerfile -t ghcr.io/qloraflow/data:0.1.0 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=0 TOKENIZERS_PARALLELISM=false
WORKDIR /root

# Exact versions from the lock file (make lock refreshes it); CPU wheels of torch.
COPY requirements/cpu.lock /tmp/cpu.lock
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && grep -v '^torch==' /tmp/cpu.lock > /tmp/rest.lock \
 && pip install -r /tmp/rest.lock

COPY pyproject.toml README.md ./
COPY qloraflow ./qloraflow
COPY tasks ./tasks
COPY workflows ./workflows
RUN pip install --no-deps -e .
