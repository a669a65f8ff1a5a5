"""Evaluate task: base and candidate (base + adapter) on the same frozen test split."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow.evaluate import comparison_html, comparison_png, evaluate_base_and_candidate
from tasks import policy
from tasks.common import config_of, print_line, stage_run, work_dir

EvalOutput = typing.NamedTuple("EvalOutput", [("metrics", str), ("samples", str)])


@task(cache=policy.cache("evaluate"), container_image=policy.TRAIN_IMAGE, requests=policy.EVAL_RESOURCES,
      accelerator=policy.TRAIN_ACCELERATOR, retries=policy.RETRIES, enable_deck=True)
def evaluate_candidate(config_yaml: str, eval_key: str, data_dir: FlyteDirectory, tok_dir: FlyteDirectory,
                       train_dir: FlyteDirectory, pipeline_run_id: str) -> EvalOutput:
    """Held-out loss/perplexity and task metrics for ``base`` (16-bit) and ``candidate`` (16-bit base + adapter,
    unmerged), on the task's GPU; samples side by side."""
    cfg = config_of(config_yaml)
    data, tok, train = data_dir.download(), tok_dir.download(), train_dir.download()
    with stage_run(cfg, "evaluate", pipeline_run_id) as tracker:
        evaluations = evaluate_base_and_candidate(cfg, data, tok, Path(train) / "adapter")
        results = {name: e.metrics for name, e in evaluations.items()}
        samples = {name: e.samples for name, e in evaluations.items()}
        for name, e in evaluations.items():
            tracker.log_metrics({**{f"{name}.{k}": v for k, v in e.metrics.items()},
                                 f"{name}.generation_tokens_per_s": e.tokens_per_s})
        table = {"prompt": [s["prompt"] for s in samples["base"]],
                 "reference": [s["reference"] for s in samples["base"]],
                 "base": [s["answer"] for s in samples["base"]], "candidate": [s["answer"] for s in samples["candidate"]]}
        tracker.log_table(table, "eval_samples.json")
        tracker.log_artifact(comparison_png(results, work_dir("evaluate") / "comparison.png"), "evaluate")
    Deck("evaluation", comparison_html(results, samples))
    for name, m in results.items():
        print_line("evaluate", f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(m.items())))
    return EvalOutput(metrics=json.dumps({**results, "mlflow_run_id": tracker.run_id}), samples=json.dumps(samples))
