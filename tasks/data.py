"""Data tasks: ingest, clean, dedupe and split (``qloraflow.data.prepare_dataset``), in one task or sharded.

``data.num_shards: 1`` runs :func:`prepare_data`. Above 1 the workflow runs ``workflows/sharded.py``'s
``sharded_data`` instead: :func:`plan_data_shards`, :func:`prepare_data_shard` in a map task, one pod
per shard, and :func:`merge_data_shards`, which writes and reports exactly what ``prepare_data`` does.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow import shard as sharding
from qloraflow.config import FinetuneConfig
from qloraflow.data import prepare_dataset, report_html
from tasks import policy
from tasks.common import config_of, print_line, stage_run, work_dir

DataOutput = typing.NamedTuple("DataOutput", [("data_dir", FlyteDirectory), ("report", str)])


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def prepare_data(config_yaml: str, data_key: str, pipeline_run_id: str) -> DataOutput:
    """Clean, deduplicated train/validation/test Parquet splits plus the quarantine and the report.

    Fails (before any GPU is requested) when nothing usable is left or too much was rejected.
    """
    cfg = config_of(config_yaml)
    out = work_dir("data")
    return _tracked(cfg, out, pipeline_run_id,
                    lambda: prepare_dataset(cfg.data, out, seed=cfg.seed, **_record_options(cfg)))


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def plan_data_shards(config_yaml: str, data_key: str, num_shards: int) -> list[str]:
    """The inputs cut into at most ``num_shards`` shards of about equal size, in input order."""
    shards = sharding.plan_data_shards(config_of(config_yaml).data, num_shards)
    print_line("data", f"{len(shards)} shard(s)")
    return shards


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def prepare_data_shard(config_yaml: str, data_key: str, shard: str) -> FlyteDirectory:
    """One shard's records read, cleaned, checked and MinHashed (no decision that needs the others)."""
    cfg = config_of(config_yaml)
    out = work_dir(f"data-shard-{sharding.shard_name(shard)}")  # map tasks run locally share a working directory
    sharding.prepare_data_shard(cfg.data, shard, out, **_record_options(cfg))
    return FlyteDirectory(str(out))


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def merge_data_shards(config_yaml: str, data_key: str, parts: list[FlyteDirectory],
                      pipeline_run_id: str) -> DataOutput:
    """Deduplicate and split every shard's records in input order: ``prepare_data``'s outputs, byte for byte."""
    cfg = config_of(config_yaml)
    out = work_dir("data")
    folders = [part.download() for part in parts]
    return _tracked(cfg, out, pipeline_run_id,
                    lambda: sharding.merge_data_shards(cfg.data, folders, out, seed=cfg.seed, **_record_options(cfg)))


def _record_options(cfg: FinetuneConfig) -> dict[str, Any]:
    """The data stage's per-record options: the token limit (with the base model's tokenizer), number
    handling and signature processes."""
    tokenizer = None
    if cfg.data.max_tokens is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.base_model, revision=cfg.model.revision)
    return dict(tokenizer=tokenizer, max_tokens=cfg.data.max_tokens,
                distinct_numbers=cfg.data.near_dup_distinct_numbers, num_workers=cfg.data.dedupe_workers)


def _tracked(cfg: FinetuneConfig, out: Path, pipeline_run_id: str, prepare: typing.Callable[[], dict]) -> DataOutput:
    """Run the stage under its MLflow run; log the report and quarantine, and show the report as a Deck."""
    with stage_run(cfg, "data", pipeline_run_id) as tracker:
        report = prepare()
        tracker.log_metrics({k: v for k, v in _flat(report).items() if isinstance(v, (int, float))})
        tracker.log_artifact(out / "report.json", "data")
        tracker.log_artifact(out / "quarantine.jsonl", "data")
    Deck("data report", report_html(report))
    report["mlflow_run_id"] = tracker.run_id
    print_line("data", f"read {report.get('read')} kept {report.get('kept')} rejected {report.get('rejected')}")
    return DataOutput(data_dir=FlyteDirectory(str(out)), report=json.dumps(report, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
