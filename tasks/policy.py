"""Operational policy, in one place: images, resources, retries, caching, per kind of step.

Cache versions are derived, never bumped by hand: each stage's version is the hash of the library
modules that decide its result (plus this policy's own salt). Edit ``qloraflow/dedupe.py`` and the
data stage and everything after it re-run; edit ``qloraflow/serve.py`` and only deployment does.
Inputs that do not change a result (the MLflow run to log into, the full config text) are ignored
by the cache key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flytekit import Cache, Resources
from flytekit.extras.accelerators import A10G

LIBRARY = Path(__file__).resolve().parent.parent / "qloraflow"
TASKS = Path(__file__).resolve().parent

# Images: one per kind of step (containers/*.Dockerfile). Where they live is a deployment choice.
REGISTRY = os.environ.get("QLORAFLOW_IMAGE_REGISTRY", "ghcr.io/qloraflow")
IMAGE_TAG = os.environ.get("QLORAFLOW_IMAGE_TAG", "0.1.0")
DATA_IMAGE = f"{REGISTRY}/data:{IMAGE_TAG}"
TRAIN_IMAGE = f"{REGISTRY}/train-cuda:{IMAGE_TAG}"
SERVE_IMAGE = f"{REGISTRY}/serve-vllm:{IMAGE_TAG}"

# Resources: the training step asks for one 24 GB GPU (A10G class).
DATA_RESOURCES = Resources(cpu="2", mem="8Gi")
TRAIN_RESOURCES = Resources(cpu="8", mem="48Gi", gpu="1")
TRAIN_ACCELERATOR = A10G
EVAL_RESOURCES = Resources(cpu="4", mem="32Gi", gpu="1")
SERVE_RESOURCES = Resources(cpu="4", mem="32Gi", gpu="1")

# Training on N GPUs of one node (train.num_gpus; tasks/train_elastic.py): one task per node size,
# because a single-node Elastic task's process count is part of its declaration.
MULTI_GPU_COUNTS = (2, 4, 8)


def train_resources(gpus: int) -> Resources:
    """What the train step asks for with ``gpus`` GPUs: 6 CPUs and 40 GiB per GPU (fits 4x and 8x A10G nodes)."""
    return TRAIN_RESOURCES if gpus == 1 else Resources(cpu=str(6 * gpus), mem=f"{40 * gpus}Gi", gpu=str(gpus))


# Retries are for infrastructure failures (node loss, preemption); user errors are raised as
# FlyteRecoverableException only where a retry can help (see tasks/train.py).
RETRIES = 2
TRAIN_INTERRUPTIBLE = True

# Inputs that never change a stage's result.
IGNORED = ("config_yaml", "pipeline_run_id")

STAGE_MODULES = {
    "data": ["config.py", "errors.py", "ingest.py", "clean.py", "dedupe.py", "data.py", "shard.py"],
    "tokenize": ["tokenize.py"],
    "train": ["train.py", "checkpoint.py", "unsloth_backend.py"],
    "evaluate": ["evaluate.py"],
    "merge": ["merge.py"],
    "deploy": ["serve.py"],
}
# Task modules per stage where a stage has more than ``<stage>.py``.
TASK_MODULES = {"train": ["train.py", "train_elastic.py"]}
# A stage's result depends on its own code and on every earlier stage's.
ORDER = ["data", "tokenize", "train", "evaluate", "merge", "deploy"]


def code_version(stage: str) -> str:
    """Hash of the library code that decides a stage's result (its own and earlier stages')."""
    h = hashlib.sha256(b"policy-v1")
    for s in ORDER[: ORDER.index(stage) + 1]:
        files = [LIBRARY / name for name in STAGE_MODULES[s]] + [TASKS / n for n in TASK_MODULES.get(s, [f"{s}.py"])]
        for p in files:
            if p.exists():
                h.update(p.name.encode())
                h.update(p.read_bytes())
    h.update((TASKS / "common.py").read_bytes())
    return h.hexdigest()[:16]


def cache(stage: str) -> Cache:
    return Cache(version=code_version(stage), serialize=True, ignored_inputs=IGNORED)
