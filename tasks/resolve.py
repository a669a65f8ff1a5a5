"""First task of every execution: validate the config, fingerprint the inputs, open the MLflow run.

It is never cached: it is what notices that a file changed at the same path. The stage settings it
returns (``qloraflow.stages``) carry exactly what decides each later stage's result, files by their
digests, so each stage re-runs when (and only when) something it depends on changed.
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path

from flytekit import task
from flytekit.types.file import FlyteFile

from qloraflow.config import load_config
from qloraflow.data import content_hash
from qloraflow.errors import ConfigError
from qloraflow.plan import check_fit
from qloraflow.preflight import check_launch
from qloraflow.stages import (DataSettings, DeploySettings, EvalSettings, ExecutionSettings, ExportSettings,
                              MergeSettings, RegisterSettings, RunContext, TokenizeSettings, TrainSettings, stage_settings)
from qloraflow.tokenize import tokenizer_hash
from qloraflow.tracking import MlflowTracker, check_reachable, resolve_tracking_uri
from tasks import policy
from tasks.common import execution_id, print_line

Resolved = typing.NamedTuple("Resolved", [
    ("data", DataSettings), ("tokenize", TokenizeSettings), ("train", TrainSettings), ("evaluate", EvalSettings),
    ("merge", MergeSettings), ("deploy", DeploySettings), ("export", ExportSettings),
    ("register", RegisterSettings),
    ("execution", ExecutionSettings), ("context", RunContext), ("num_gpus", int), ("data_shards", int),
    ("tokenize_shards", int)])


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


def source_tags(commit: str) -> dict[str, str]:
    """The tags MLflow's Source, User and Version columns read, for every run of the execution.

    ``commit`` is the ``git.commit`` tag: MLflow's own tag holds the bare commit, ``git.commit`` keeps
    the ``-dirty`` mark of uncommitted changes.
    """
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = "unknown"
    local = execution_id() in ("local", "none")
    tags = {"mlflow.source.name": "workflows/finetune.py", "mlflow.source.type": "LOCAL" if local else "JOB",
            "mlflow.user": user}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def run_name(name: str) -> str:
    """One name per execution: ``<name>-<yyyymmdd-hhmmss>`` (UTC), with the Flyte execution id on a cluster."""
    import datetime

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    execution = execution_id()
    return f"{name}-{stamp}" if execution in ("local", "none") else f"{name}-{stamp}-{execution}"


def input_fingerprints(cfg) -> dict[str, str]:  # noqa: ANN001
    """Content hashes of the files a run reads: data, base model, its tokenizer, the eval database."""
    model_fp = model_fingerprint(cfg.model.base_model, cfg.model.revision)
    return {"data": content_hash(cfg.data.train_files + cfg.data.test_files), "model": model_fp,
            "tokenizer": tokenizer_hash(cfg.model.base_model) if Path(cfg.model.base_model).exists() else model_fp,
            "sqlite_db": content_hash([cfg.eval.sqlite_db]) if cfg.eval.sqlite_db else ""}


@task(container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES)
def resolve_config(config: FlyteFile) -> Resolved:
    """Validate the config (every problem at once), hash the inputs, and start the pipeline's MLflow run."""
    cfg = load_config(config.download())
    if cfg.train.num_gpus != 1 and cfg.train.num_gpus not in policy.MULTI_GPU_COUNTS:
        raise ConfigError(config.path, [f"'train.num_gpus' is {cfg.train.num_gpus}; the train tasks run on 1 or "
                                        f"{', '.join(map(str, policy.MULTI_GPU_COUNTS))} GPUs of one node"])
    check_launch(cfg, config.path)  # missing files and incomplete weights fail here, each naming its key
    fit = check_fit(cfg, config.path, policy.TRAIN_GPU)  # a config that cannot fit the train task's GPU fails here
    check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))
    d = cfg.to_dict()
    fp = input_fingerprints(cfg)
    settings = stage_settings(cfg, fp)
    environment = environment_tags()
    tags, name = source_tags(environment["git.commit"]), run_name(cfg.name)
    tracker = MlflowTracker(cfg.tracking.experiment, cfg.tracking.tracking_uri, run_name=name,
                            tags={"flyte.execution_id": execution_id(), "qloraflow.pipeline": "finetune",
                                  "qloraflow.name": cfg.name, "dataset.hash": fp["data"], "config.hash": cfg.hash(),
                                  "model.base": cfg.model.base_model, "model.revision": cfg.model.revision or "",
                                  "model.fingerprint": fp["model"], **environment, **tags})
    flat = {f"{sec}.{k}": v for sec, vals in d.items() if isinstance(vals, dict) for k, v in vals.items()}
    try:
        tracker.log_params({**flat, "name": cfg.name, "seed": cfg.seed})
        tracker.log_dict(d, "config.json")
    except BaseException as e:  # the run was made: it must not stay RUNNING
        tracker.set_tags({"qloraflow.failed_stage": "resolve", "qloraflow.error": f"{type(e).__name__}: {e}"[:4000]})
        tracker.close("FAILED")
        raise
    print_line("resolve", f"config {cfg.name} valid; {fit}; data {fp['data'][:12]}; MLflow run {name} "
                          f"({tracker.run_id})")
    context = RunContext(pipeline_run_id=tracker.run_id, name=cfg.name, experiment=cfg.tracking.experiment,
                         tracking_uri=cfg.tracking.tracking_uri, run_name=name, tags=tags)
    return Resolved(**settings._asdict(), context=context, num_gpus=cfg.train.num_gpus,
                    data_shards=cfg.data.num_shards, tokenize_shards=cfg.tokenize.num_shards)
