"""Data task: ingest, clean, dedupe and split (``qloraflow.data.prepare_dataset``)."""

from __future__ import annotations

import json
import typing

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow.data import prepare_dataset, report_html
from tasks import policy
from tasks.common import config_of, print_line, stage_tracker, work_dir

DataOutput = typing.NamedTuple("DataOutput", [("data_dir", FlyteDirectory), ("report", str)])


@task(cache=policy.cache("data"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def prepare_data(config_yaml: str, data_key: str, pipeline_run_id: str) -> DataOutput:
    """Clean, deduplicated train/validation/test Parquet splits plus the quarantine and the report.

    Fails (before any GPU is requested) when nothing usable is left or too much was rejected.
    """
    cfg = config_of(config_yaml)
    out = work_dir("data")
    tracker = stage_tracker(cfg, "data", pipeline_run_id)
    try:
        tokenizer = None
        if cfg.data.max_tokens is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model.base_model, revision=cfg.model.revision)
        report = prepare_dataset(cfg.data, out, seed=cfg.seed, tokenizer=tokenizer, max_tokens=cfg.data.max_tokens,
                                 distinct_numbers=cfg.data.near_dup_distinct_numbers,
                                 num_workers=cfg.data.dedupe_workers)
    except Exception:
        tracker.close("FAILED")
        raise
    tracker.log_metrics({k: v for k, v in _flat(report).items() if isinstance(v, (int, float))})
    tracker.log_artifact(out / "report.json", "data")
    tracker.log_artifact(out / "quarantine.jsonl", "data")
    tracker.close()
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
