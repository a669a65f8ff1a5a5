"""Operational policy, in one place: images, resources, retries, caching, per kind of step.

Cache versions are derived, never bumped by hand: each stage's version is the hash of the code its
task imports, followed through the package's imports (:func:`stage_files`), and of every earlier
stage's. Edit ``qloraflow/dedupe.py`` and the data stage and everything after it re-run; edit
``qloraflow/serve.py`` and only deployment does.
A stage's cache key is its settings (``qloraflow.stages``) and the folders of the stages before it;
the inputs that do not change a result (how the work is spread, the MLflow run to log into) are
ignored by it.
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

# Resources: training, evaluation and the merge each ask for one 24 GB GPU (A10G class). Measured at
# the Llama-3-8B shape under a 24 GiB cap (benchmarks/pipeline_scale.py, one H200, 2026-12-01):
# train 16.3 GiB GPU reserved / 16.0 GiB host RSS, evaluate 22.4 / 15.9, merge + verify 16.1 / 17.1
# (host RSS is mostly the memory-mapped 16 GB of safetensors), data and tokenize under 1 GiB of RSS.
DATA_RESOURCES = Resources(cpu="2", mem="8Gi")
TRAIN_RESOURCES = Resources(cpu="8", mem="48Gi", gpu="1")
TRAIN_ACCELERATOR = A10G
# The row of qloraflow.plan.GPUS that TRAIN_ACCELERATOR is: the first task refuses a config whose
# predicted peak memory does not fit it (qloraflow.plan.check_fit), before any GPU is requested.
PLAN_GPUS = {"nvidia-a10g": "a10g", "nvidia-l4": "l4", "nvidia-tesla-a100": "a100-40gb",
             "nvidia-a100-80gb": "a100-80gb", "nvidia-h100": "h100", "nvidia-h200": "h200"}
TRAIN_GPU = PLAN_GPUS[TRAIN_ACCELERATOR.to_flyte_idl().device]
EVAL_RESOURCES = Resources(cpu="4", mem="32Gi", gpu="1")  # evaluate and merge, with TRAIN_ACCELERATOR
SERVE_RESOURCES = Resources(cpu="4", mem="32Gi", gpu="1")
# GGUF conversion, quantization and the llama.cpp parity check run on CPUs (the merged model in float32).
EXPORT_RESOURCES = Resources(cpu="8", mem="32Gi")

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

# Inputs that never change a stage's result: qloraflow.stages.ExecutionSettings and RunContext.
IGNORED = ("execution", "context")

# Each stage's task modules. Its code version covers what they import from the package, transitively:
# an edit of qloraflow/attention.py (imported by the training code) re-runs training and what follows.
TASK_MODULES = {"data": ["data.py"], "tokenize": ["tokenize.py"], "train": ["train.py", "train_elastic.py"],
                "evaluate": ["evaluate.py"], "merge": ["merge.py"], "deploy": ["deploy.py"],
                "export": ["export.py"]}
# A stage's result depends on its own code and on every earlier stage's.
ORDER = ["data", "tokenize", "train", "evaluate", "merge", "deploy", "export"]
# Operational policy (this file) never changes a result.
NOT_RESULTS = {TASKS / "policy.py"}


def imported_files(path: Path) -> set[Path]:
    """The package's files (``qloraflow/``, ``tasks/``) that ``path`` imports, directly, lazily inside functions too."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top, _, rest = name.partition(".")
            root = {"qloraflow": LIBRARY, "tasks": TASKS}.get(top)
            if root is None or not rest:
                continue
            candidate = root / (rest.replace(".", "/") + ".py")
            if candidate.exists():
                found.add(candidate)
    return found


def import_closure(paths: list[Path]) -> list[Path]:
    """``paths`` and every package file they reach through imports, sorted."""
    seen, todo = set(), list(paths)
    while todo:
        path = todo.pop()
        if path in seen or path in NOT_RESULTS:
            continue
        seen.add(path)
        todo.extend(imported_files(path) - seen)
    return sorted(seen)


def stage_files(stage: str) -> list[Path]:
    """The code that decides a stage's result: the import closure of its tasks and of every earlier stage's."""
    tasks = [TASKS / name for s in ORDER[: ORDER.index(stage) + 1] for name in TASK_MODULES[s]]
    return import_closure([p for p in tasks if p.exists()])


def code_version(stage: str) -> str:
    """Hash of the code that decides a stage's result (:func:`stage_files`), names and bytes."""
    h = hashlib.sha256(b"policy-v2")
    for p in stage_files(stage):
        h.update(p.relative_to(LIBRARY.parent).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache(stage: str) -> Cache:
    return Cache(version=code_version(stage), serialize=True, ignored_inputs=IGNORED)
