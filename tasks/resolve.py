"""First task of every execution: validate the config, fingerprint the inputs, open the MLflow run.

It is never cached: it is what notices that a file changed at the same path. The cache keys it
returns carry exactly what decides each later stage's result, so each stage re-runs when (and only
when) something it depends on changed.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path

from flytekit import task
from flytekit.types.file import FlyteFile

from qloraflow.config import config_to_yaml, load_config
from qloraflow.data import content_hash
from qloraflow.tokenize import tokenizer_hash
from qloraflow.tracking import MlflowTracker, check_reachable, resolve_tracking_uri
from tasks import policy
from tasks.common import execution_id, print_line

Resolved = typing.NamedTuple("Resolved", [
    ("config_yaml", str), ("data_key", str), ("tokenize_key", str), ("train_key", str), ("eval_key", str),
    ("merge_key", str), ("serve_key", str), ("pipeline_run_id", str)])


def model_fingerprint(model: str, revision: str | None) -> str:
    """Small files by content, weight files by name and size: cheap even for 16 GB of weights."""
    path = Path(model)
    if not path.exists():
        return f"hub:{model}@{revision or 'main'}"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes() if p.stat().st_size < 50 * 2**20 else str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def environment_tags() -> dict[str, str]:
    """Package versions and the git commit: what a run needs to be reproduced."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "flytekit", "mlflow", "unsloth"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        tags["git.commit"] = commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git.commit"] = "unknown"
    return tags


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def resolve_config(config: FlyteFile) -> Resolved:
    """Validate the config (every problem at once), hash the inputs, and start the pipeline's MLflow run."""
    cfg = load_config(config.download())
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))
    d = cfg.to_dict()
    data_hash = content_hash(cfg.data.train_files + cfg.data.test_files)
    model_fp = model_fingerprint(cfg.model.base_model, cfg.model.revision)
    tok_fp = tokenizer_hash(cfg.model.base_model) if Path(cfg.model.base_model).exists() else model_fp
    db_fp = content_hash([cfg.eval.sqlite_db]) if cfg.eval.sqlite_db else ""
    keys = {
        "data_key": _key(d["data"], cfg.seed, data_hash),
        "tokenize_key": _key(d["tokenize"], tok_fp),
        "train_key": _key(d["model"], d["lora"], d["train"], cfg.seed, model_fp),
        "eval_key": _key(d["eval"], cfg.model.compute_dtype, db_fp),
        "merge_key": _key(d["merge"], cfg.model.compute_dtype),
        "serve_key": _key(d["serve"]),
    }
    tracker = MlflowTracker(cfg.tracking.experiment, cfg.tracking.tracking_uri, run_name=cfg.name,
                            tags={"flyte.execution_id": execution_id(), "qloraflow.pipeline": "finetune",
                                  "dataset.hash": data_hash, "config.hash": cfg.hash(),
                                  "model.base": cfg.model.base_model, "model.revision": cfg.model.revision or "",
                                  "model.fingerprint": model_fp, **environment_tags()})
    flat = {f"{sec}.{k}": v for sec, vals in d.items() if isinstance(vals, dict) for k, v in vals.items()}
    tracker.log_params({**flat, "name": cfg.name, "seed": cfg.seed})
    tracker.log_dict(d, "config.json")
    print_line("resolve", f"config {cfg.name} valid; data {data_hash[:12]}; MLflow run {tracker.run_id}")
    return Resolved(config_yaml=config_to_yaml(cfg), pipeline_run_id=tracker.run_id, **keys)
