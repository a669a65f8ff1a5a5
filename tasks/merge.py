"""Merge task: fold the adapter into 16-bit base weights and verify the result."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow.errors import MergeVerificationError
from qloraflow.evaluate import evaluate_model
from qloraflow.merge import merge_adapter, verify_merge
from tasks import policy
from tasks.common import config_of, print_line, stage_tracker, work_dir

MergeOutput = typing.NamedTuple("MergeOutput", [("merged_dir", FlyteDirectory), ("report", str)])


@task(cache=policy.cache("merge"), container_image=policy.TRAIN_IMAGE, requests=policy.EVAL_RESOURCES,
      retries=policy.RETRIES)
def merge_model(config_yaml: str, merge_key: str, train_dir: FlyteDirectory, data_dir: FlyteDirectory,
                tok_dir: FlyteDirectory, candidate_metrics: str, pipeline_run_id: str) -> MergeOutput:
    """Merged safetensors in the training dtype; fails unless logits and metrics match the adapter."""
    cfg = config_of(config_yaml)
    adapter = Path(train_dir.download()) / "adapter"
    merged = work_dir("merge") / "merged_model"
    info = merge_adapter(cfg.model.base_model, adapter, merged, cfg.model.compute_dtype)
    data, tok = data_dir.download(), tok_dir.download()
    metrics, samples = evaluate_model(cfg, str(merged), data, tok)
    prompts = [s["prompt"] for s in samples[:8]]
    info["verify"] = verify_merge(cfg.model.base_model, adapter, merged, prompts, cfg.merge.logits_rtol,
                                  cfg.model.compute_dtype)
    gate = cfg.eval.gate_metric
    adapter_metric = json.loads(candidate_metrics)["candidate"][gate]
    drop = adapter_metric - metrics[gate]
    if drop > cfg.merge.metric_tolerance:
        raise MergeVerificationError(f"merged model scores {gate}={metrics[gate]:.4f}, the adapter {adapter_metric:.4f}: "
                                     f"a drop of {drop:.4f} > merge.metric_tolerance {cfg.merge.metric_tolerance}")
    info.update(metrics=metrics, samples=samples, metric_drop=drop)
    tracker = stage_tracker(cfg, "merge", pipeline_run_id)
    tracker.log_metrics({f"merged.{k}": v for k, v in metrics.items()})
    tracker.log_metrics({"max_logit_diff": info["verify"]["max_logit_diff"], "merged_bytes": info["bytes"]})
    tracker.close()
    info["mlflow_run_id"] = tracker.run_id
    print_line("merge", f"{merged} ({info['bytes'] / 2**20:.1f} MiB {info['dtype']}), max logit diff "
                        f"{info['verify']['max_logit_diff']:.4f}, {gate} {metrics[gate]:.3f}")
    return MergeOutput(merged_dir=FlyteDirectory(str(merged)), report=json.dumps(info, default=str))
