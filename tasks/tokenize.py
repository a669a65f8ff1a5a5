"""Tokenize tasks: chat template, label masking, packing (``qloraflow.tokenize.tokenize_dataset``), one or sharded.

``tokenize.num_shards: 1`` runs :func:`tokenize_data`. Above 1 the workflow runs ``workflows/sharded.py``'s
``sharded_tokenize``: :func:`plan_tokenize_shards`, :func:`tokenize_shard` in a map task, and
:func:`merge_tokenize_shards`, which packs and saves exactly what ``tokenize_data`` does.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow import shard as sharding
from qloraflow.config import FinetuneConfig
from qloraflow.reports import tokenize_html
from qloraflow.tokenize import tokenize_dataset
from tasks import policy
from tasks.common import config_of, print_line, stage_run, work_dir

TokenizeOutput = typing.NamedTuple("TokenizeOutput", [("tok_dir", FlyteDirectory), ("report", str)])


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def tokenize_data(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory,
                  pipeline_run_id: str) -> TokenizeOutput:
    """Tokenized Arrow splits, the tokenizer with the chat template used, and the token report."""
    cfg = config_of(config_yaml)
    out = work_dir("tokenize")
    return _tracked(cfg, out, pipeline_run_id,
                    lambda: tokenize_dataset(cfg.tokenize, data_dir.download(), cfg.model.base_model, out))


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def plan_tokenize_shards(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory, num_shards: int) -> list[str]:
    """The prepared splits' rows cut into at most ``num_shards`` shards of about equal rows."""
    return sharding.plan_tokenize_shards(data_dir.download(), num_shards)


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def tokenize_shard(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory, shard: str) -> FlyteDirectory:
    """One shard's records encoded (input ids and labels; no length policy or packing yet)."""
    cfg = config_of(config_yaml)
    out = work_dir(f"tokenize-shard-{sharding.shard_name(shard)}")  # map tasks run locally share a working directory
    sharding.tokenize_shard(cfg.tokenize, shard, data_dir.download(), cfg.model.base_model, out)
    return FlyteDirectory(str(out))


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def merge_tokenize_shards(config_yaml: str, tokenize_key: str, data_dir: FlyteDirectory, parts: list[FlyteDirectory],
                          pipeline_run_id: str) -> TokenizeOutput:
    """Length policy and packing over every shard's rows in data order: ``tokenize_data``'s outputs."""
    cfg = config_of(config_yaml)
    out = work_dir("tokenize")
    folders = [part.download() for part in parts]
    return _tracked(cfg, out, pipeline_run_id, lambda: sharding.merge_tokenize_shards(
        cfg.tokenize, folders, data_dir.download(), cfg.model.base_model, out))


def _tracked(cfg: FinetuneConfig, out: Path, pipeline_run_id: str,
             tokenize: typing.Callable[[], dict]) -> TokenizeOutput:
    """Run the stage under its MLflow run; log the token counts and report, and show it as a Deck."""
    with stage_run(cfg, "tokenize", pipeline_run_id) as tracker:
        report = tokenize()
        for split, r in report["splits"].items():
            tracker.log_metrics({f"{split}.{k}": v for k, v in r.items()})
        tracker.log_artifact(out / "report.json", "tokenize")
    Deck("tokenize report", tokenize_html(report))
    report["mlflow_run_id"] = tracker.run_id
    train = report["splits"].get("train", {})
    print_line("tokenize", f"{train.get('tokens')} train tokens, packing efficiency {train.get('packing_efficiency')}")
    return TokenizeOutput(tok_dir=FlyteDirectory(str(out)), report=json.dumps(report))
