"""Data tasks: ingest, clean, dedupe and split (``qloraflow.data.prepare_dataset``), in one task or sharded.

``data.num_shards: 1`` runs :func:`prepare_data`. Above 1 the workflow runs ``workflows/sharded.py``'s
``sharded_data`` instead: :func:`plan_data_shards`, :func:`prepare_data_shard` in a map task, one pod
per shard, and :func:`merge_data_shards`, which writes and reports exactly what ``prepare_data`` does.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow import data as data_stage
from qloraflow import lineage
from qloraflow import shard as sharding
from qloraflow.config import DataConfig
from qloraflow.data import prepare_dataset
from qloraflow.splits import report_html
from qloraflow.reports import page_html
from qloraflow.stages import DataResult, DataSettings, ExecutionSettings, RunContext
from tasks import policy
from tasks.common import fails_the_pipeline_run, print_line, show_deck, stage_run, work_dir

DataOutput = typing.NamedTuple("DataOutput", [("data_dir", FlyteDirectory), ("result", DataResult)])


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def prepare_data(settings: DataSettings, execution: ExecutionSettings, context: RunContext) -> DataOutput:
    """Clean, deduplicated train/validation/test Parquet splits plus the quarantine and the report.

    Fails (before any GPU is requested) when nothing usable is left or too much was rejected.
    """
    data, out = _data_config(settings, execution), work_dir("data")
    return _tracked(context, settings, out, lambda: prepare_dataset(data, out, seed=settings.seed,
                                                                    **_record_options(settings, data)))


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def plan_data_shards(settings: DataSettings, num_shards: int, context: RunContext) -> list[str]:
    """The inputs cut into at most ``num_shards`` shards of about equal size, in input order."""
    with fails_the_pipeline_run(context, "data"):
        shards = sharding.plan_data_shards(settings.data, num_shards)
    print_line("data", f"{len(shards)} shard(s)")
    return shards


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def prepare_data_shard(settings: DataSettings, execution: ExecutionSettings, context: RunContext,
                       shard: str) -> FlyteDirectory:
    """One shard's records read, cleaned, checked and MinHashed (no decision that needs the others)."""
    data = _data_config(settings, execution)
    out = work_dir(f"data-shard-{sharding.shard_name(shard)}")  # map tasks run locally share a working directory
    with fails_the_pipeline_run(context, f"data shard {sharding.shard_name(shard)}"):
        data_stage.prepare_data_shard(data, shard, out, **_record_options(settings, data))
    return FlyteDirectory(str(out))


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def merge_data_shards(settings: DataSettings, execution: ExecutionSettings, parts: list[FlyteDirectory],
                      context: RunContext) -> DataOutput:
    """Deduplicate and split every shard's records in input order: ``prepare_data``'s outputs, byte for byte."""
    data, out = _data_config(settings, execution), work_dir("data")
    return _tracked(context, settings, out, lambda: data_stage.merge_data_shards(
        data, [part.download() for part in parts], out, seed=settings.seed, **_record_options(settings, data)))


def _data_config(settings: DataSettings, execution: ExecutionSettings) -> DataConfig:
    return execution.apply("data", settings.data)


def _record_options(settings: DataSettings, data: DataConfig) -> dict[str, Any]:
    """The data stage's per-record options: the token limit (with the base model's tokenizer), number
    handling and signature processes."""
    tokenizer = None
    if data.max_tokens is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(settings.base_model, revision=settings.revision)
    return dict(tokenizer=tokenizer, max_tokens=data.max_tokens,
                distinct_numbers=data.near_dup_distinct_numbers, num_workers=data.dedupe_workers)


def _tracked(context: RunContext, settings: DataSettings, out: Path,
             prepare: typing.Callable[[], dict]) -> DataOutput:
    """Run the stage under its MLflow run: the counts as metrics, the per-source counts, report and
    quarantine as artifacts, the splits as the run's datasets; the report as a Deck."""
    # A failed stage (too many rejects) still logs its quarantine and report: they say why.
    with stage_run(context, "data", reports=[out / "report.json", out / "quarantine.jsonl"]) as tracker:
        report = prepare()
        splits = lineage.write_description(out, settings.data_digest, report["sources"])
        tracker.set_tags({"dataset.hash": settings.data_digest})
        tracker.log_metrics(report_metrics(report))
        tracker.log_dict(report["sources"], "data/sources.json")
        tracker.log_artifact(out / "report.json", "data")
        tracker.log_artifact(out / "quarantine.jsonl", "data")
        tracker.log_inputs(lineage.dataset_inputs(splits, lineage.SPLITS, context.name, out))
    page = report_html(report)
    show_deck({"data report": page})
    print_line("data", f"read {report.get('read')} kept {report.get('kept')} rejected {report.get('rejected')}")
    result = DataResult(read=report["read"], kept=report["kept"], rejected=report["rejected"],
                        rejected_by_reason=dict(report.get("rejected_by_reason", {})), mlflow_run_id=tracker.run_id,
                        report_html=page_html("data", page))
    return DataOutput(data_dir=FlyteDirectory(str(out)), result=result)


# Not metrics: per-source counts are named by file paths (they go to data/sources.json), the settings
# are the pipeline run's params, and the histograms and examples are in report.json.
NOT_METRICS = ("sources", "config", "seed", "length_histogram", "near_duplicate_examples", "outputs")


def report_metrics(report: dict) -> dict[str, float]:
    """The report's counts as MLflow metrics: read, kept, rejected, reject_rate, per reason, split, format, dedupe."""
    flat = _flat({k: v for k, v in report.items() if k not in NOT_METRICS})
    return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
