"""Evaluate task: base and candidate (base + adapter) on the same frozen test split."""

from __future__ import annotations

from pathlib import Path

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from qloraflow import lineage
from qloraflow.comparison import comparison_png, evaluation_html, paired_tests_html, samples_table
from qloraflow.evaluate import evaluate_base_and_candidate
from qloraflow.reports import page_html
from qloraflow.paired import BINARY_METRICS, paired_test
from qloraflow.stages import EvalResult, EvalSettings, RunContext, Sample
from tasks import policy
from tasks.common import print_line, show_deck, stage_run, work_dir


@task(cache=policy.cache("evaluate"), container_image=policy.TRAIN_IMAGE, requests=policy.EVAL_RESOURCES,
      accelerator=policy.TRAIN_ACCELERATOR, retries=policy.RETRIES, enable_deck=True)
def evaluate_candidate(settings: EvalSettings, data_dir: FlyteDirectory, tok_dir: FlyteDirectory,
                       train_dir: FlyteDirectory, context: RunContext) -> EvalResult:
    """Held-out loss/perplexity and task metrics for ``base`` (16-bit) and ``candidate`` (16-bit base + adapter,
    unmerged), on the task's GPU; samples side by side."""
    with stage_run(context, "evaluate") as tracker:
        data, tok, train = data_dir.download(), tok_dir.download(), train_dir.download()
        tracker.log_inputs(lineage.dataset_inputs(lineage.read_description(data), ["test"], context.name, data))
        evaluations = evaluate_base_and_candidate(settings.config(), data, tok, Path(train) / "adapter")
        results = {name: e.metrics for name, e in evaluations.items()}
        samples = {name: e.samples for name, e in evaluations.items()}
        for name, e in evaluations.items():
            tracker.log_metrics({**{f"{name}.{k}": v for k, v in e.metrics.items()},
                                 f"{name}.generation_tokens_per_s": e.tokens_per_s})
        base, candidate = evaluations["base"], evaluations["candidate"]
        table = samples_table(samples)  # the question, the reference, each model's answer and verdict
        tracker.log_table(table, "eval_samples.json")
        png = Path(comparison_png(results, work_dir("evaluate") / "comparison.png"))
        tracker.log_artifact(png, "evaluate")
        # Candidate against base on every task metric, paired by record id (the gate's test, at 95%).
        tests = {f"candidate vs base: {m}": paired_test(candidate.verdicts(m), base.verdicts(m),
                                                        binary=m in BINARY_METRICS, names=("candidate", "base")).as_dict()
                 for m in (samples["base"][0]["scores"] if samples["base"] else {})}
        tracker.log_dict(tests, "evaluate/paired_tests.json")
    page = evaluation_html(results, table, png.read_bytes()) + paired_tests_html(tests)
    show_deck({"evaluation": page})
    for name, m in results.items():
        print_line("evaluate", f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(m.items())))
    return EvalResult(metrics={name: {k: float(v) for k, v in m.items()} for name, m in results.items()},
                      samples={name: Sample.keyed(ss) for name, ss in samples.items()},
                      mlflow_run_id=tracker.run_id, report_html=page_html("evaluate", page))
