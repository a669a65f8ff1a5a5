"""Evaluate task: base and candidate (base + adapter) on the same frozen test split."""

from __future__ import annotations

from pathlib import Path

from flytekit import Deck, task
from flytekit.types.directory import FlyteDirectory

from qloraflow.evaluate import comparison_html, comparison_png, evaluate_base_and_candidate
from qloraflow.stages import EvalResult, EvalSettings, RunContext, Sample
from tasks import policy
from tasks.common import print_line, stage_run, work_dir


@task(cache=policy.cache("evaluate"), container_image=policy.TRAIN_IMAGE, requests=policy.EVAL_RESOURCES,
      accelerator=policy.TRAIN_ACCELERATOR, retries=policy.RETRIES, enable_deck=True)
def evaluate_candidate(settings: EvalSettings, data_dir: FlyteDirectory, tok_dir: FlyteDirectory,
                       train_dir: FlyteDirectory, context: RunContext) -> EvalResult:
    """Held-out loss/perplexity and task metrics for ``base`` (16-bit) and ``candidate`` (16-bit base + adapter,
    unmerged), on the task's GPU; samples side by side."""
    data, tok, train = data_dir.download(), tok_dir.download(), train_dir.download()
    with stage_run(context, "evaluate") as tracker:
        evaluations = evaluate_base_and_candidate(settings.config(), data, tok, Path(train) / "adapter")
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
    return EvalResult(metrics={name: {k: float(v) for k, v in m.items()} for name, m in results.items()},
                      samples={name: [Sample.of(s) for s in ss] for name, ss in samples.items()},
                      mlflow_run_id=tracker.run_id)
