"""Tokenize tasks: chat template, label masking, packing (``qloraflow.tokenize.tokenize_dataset``), one or sharded.

``tokenize.num_shards: 1`` runs :func:`tokenize_data`. Above 1 the workflow runs ``workflows/sharded.py``'s
``sharded_tokenize``: :func:`plan_tokenize_shards`, :func:`tokenize_shard` in a map task, and
:func:`merge_tokenize_shards`, which packs and saves exactly what ``tokenize_data`` does.
"""

from __future__ import annotations

import typing
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow import lineage
from qloraflow import shard as sharding
from qloraflow import tokenize as tokenize_stage
from qloraflow.config import TokenizeConfig
from qloraflow.reports import page_html, tokenize_html
from qloraflow.stages import ExecutionSettings, RunContext, TokenizeResult, TokenizeSettings
from qloraflow.tokenize import tokenize_dataset
from tasks import policy
from tasks.common import fails_the_pipeline_run, print_line, show_deck, stage_run, work_dir

TokenizeOutput = typing.NamedTuple("TokenizeOutput", [("tok_dir", FlyteDirectory), ("result", TokenizeResult)])


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def tokenize_data(settings: TokenizeSettings, data_dir: FlyteDirectory, execution: ExecutionSettings,
                  context: RunContext) -> TokenizeOutput:
    """Tokenized Arrow splits, the tokenizer with the chat template used, and the token report."""
    tokenize, out = _tokenize_config(settings, execution), work_dir("tokenize")
    return _tracked(context, out, data_dir,
                    lambda data: tokenize_dataset(tokenize, data, settings.base_model, out))


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def plan_tokenize_shards(settings: TokenizeSettings, data_dir: FlyteDirectory, num_shards: int,
                         context: RunContext) -> list[str]:
    """The prepared splits' rows cut into at most ``num_shards`` shards of about equal rows."""
    with fails_the_pipeline_run(context, "tokenize"):
        return sharding.plan_tokenize_shards(data_dir.download(), num_shards)


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES)
def tokenize_shard(settings: TokenizeSettings, data_dir: FlyteDirectory, execution: ExecutionSettings,
                   context: RunContext, shard: str) -> FlyteDirectory:
    """One shard's records encoded (input ids and labels; no length policy or packing yet)."""
    out = work_dir(f"tokenize-shard-{sharding.shard_name(shard)}")  # map tasks run locally share a working directory
    with fails_the_pipeline_run(context, f"tokenize shard {sharding.shard_name(shard)}"):
        tokenize_stage.tokenize_shard(_tokenize_config(settings, execution), shard, data_dir.download(),
                                      settings.base_model, out)
    return FlyteDirectory(str(out))


@task(cache=policy.cache("tokenize"), container_image=policy.DATA_IMAGE, requests=policy.DATA_RESOURCES,
      retries=policy.RETRIES, enable_deck=True)
def merge_tokenize_shards(settings: TokenizeSettings, data_dir: FlyteDirectory, parts: list[FlyteDirectory],
                          execution: ExecutionSettings, context: RunContext) -> TokenizeOutput:
    """Length policy and packing over every shard's rows in data order: ``tokenize_data``'s outputs."""
    tokenize, out = _tokenize_config(settings, execution), work_dir("tokenize")
    return _tracked(context, out, data_dir, lambda data: tokenize_stage.merge_tokenize_shards(
        tokenize, [part.download() for part in parts], data, settings.base_model, out))


def _tokenize_config(settings: TokenizeSettings, execution: ExecutionSettings) -> TokenizeConfig:
    return execution.apply("tokenize", settings.tokenize)


def _tracked(context: RunContext, out: Path, data_dir: FlyteDirectory,
             tokenize: typing.Callable[[str], dict]) -> TokenizeOutput:
    """Run the stage under its MLflow run; log the token counts and report, and show it as a Deck.

    The data splits' description (``qloraflow.lineage``) travels on in the output: training reads only
    this folder and logs the same datasets."""
    with stage_run(context, "tokenize", reports=[out / "report.json"]) as tracker:
        data = data_dir.download()
        report = tokenize(data)
        lineage.copy_description(data, out)
        for split, r in report["splits"].items():
            tracker.log_metrics({f"{split}.{k}": v for k, v in r.items()})
        tracker.log_artifact(out / "report.json", "tokenize")
    page = tokenize_html(report)
    show_deck({"tokenize report": page})
    splits = report["splits"]
    train = splits.get("train", {})
    print_line("tokenize", f"{train.get('tokens')} train tokens, packing efficiency {train.get('packing_efficiency')}")
    result = TokenizeResult(tokens={k: int(v["tokens"]) for k, v in splits.items()},
                            trained_tokens={k: int(v["trained_tokens"]) for k, v in splits.items()},
                            packing_efficiency={k: float(v.get("packing_efficiency") or 0.0)
                                                for k, v in splits.items()},
                            mlflow_run_id=tracker.run_id, report_html=page_html("tokenize", page))
    return TokenizeOutput(tok_dir=FlyteDirectory(str(out)), result=result)
