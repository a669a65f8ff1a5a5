"""Tokenize task: chat template, label masking, packing (``qloraflow.tokenize.tokenize_dataset``)."""

from __future__ import annotations

import html
import json
import typing

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow.tokenize import tokenize_dataset
from tasks import policy
from tasks.common import config_of, print_line, stage_tracker, work_dir

TokenizeOutput = typing.NamedTuple("TokenizeOutput", [("tok_dir", FlyteDirectory), ("report", str)])


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def tokenize_data(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory,
                  pipeline_run_id: str) -> TokenizeOutput:
    """Tokenized Arrow splits, the tokenizer with the chat template used, and the token report."""
    cfg = config_of(config_yaml)
    out = work_dir("tokenize")
    tracker = stage_tracker(cfg, "tokenize", pipeline_run_id)
    report = tokenize_dataset(cfg.tokenize, data_dir.download(), cfg.model.base_model, out)
    for split, r in report["splits"].items():
        tracker.log_metrics({f"{split}.{k}": v for k, v in r.items()})
    tracker.log_artifact(out / "report.json", "tokenize")
    tracker.close()
    Deck("tokenize report", "<pre>" + html.escape(json.dumps(report, indent=1)) + "</pre>")
    report["mlflow_run_id"] = tracker.run_id
    train = report["splits"].get("train", {})
    print_line("tokenize", f"{train.get('tokens')} train tokens, packing efficiency {train.get('packing_efficiency')}")
    return TokenizeOutput(tok_dir=FlyteDirectory(str(out)), report=json.dumps(report))
