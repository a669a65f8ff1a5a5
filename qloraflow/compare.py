"""Compare pipeline runs of an MLflow experiment: a sortable table, loss curves and eval bars.

    qloraflow compare --experiment qloraflow-demo --params train.learning_rate lora.r \
        --metrics candidate.exact_match candidate.heldout_loss --sort candidate.exact_match --out compare.png

    qloraflow compare --experiment qloraflow-demo --sweep 0d24b52e --metrics validation.eval_loss  # one sweep's trials

Each row is one pipeline run (a sweep's trial is one, ``workflows/sweep.py``): the parent run the first
task opens, tagged with its Flyte execution id; its loss curve comes from its nested ``train`` stage
run. The same runs, params and metrics are what ``mlflow ui`` shows, so the two views agree.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from qloraflow.errors import QloraflowError

DEFAULT_PARAMS = ["train.learning_rate", "lora.r", "train.max_steps"]
DEFAULT_METRICS = ["base.exact_match", "candidate.exact_match", "candidate.heldout_loss"]


class ExperimentNotFound(QloraflowError, ValueError):
    """The experiment named is not in the tracking store."""


def pipeline_runs(client: Any, experiment: str, sweep: Optional[str] = None) -> list[Any]:
    """The experiment's pipeline runs (a sweep's trials among them), oldest first; with ``sweep`` (a sweep
    run's id or its first characters) only that sweep's trials."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ExperimentNotFound(
            f"MLflow experiment {experiment!r} does not exist at {client.tracking_uri} "
            f"(experiments there: {', '.join(known) or 'none'}); pass --experiment with one of them, or point "
            "--tracking-uri / $MLFLOW_TRACKING_URI at the store the pipeline wrote")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`qloraflow.pipeline` = 'finetune'",
                              max_results=1000)
    if sweep:
        trials = [r for r in runs if r.data.tags.get("qloraflow.sweep", "").startswith(sweep)]
        if not trials:
            known = sorted({r.data.tags["qloraflow.sweep"][:8] for r in runs if "qloraflow.sweep" in r.data.tags})
            raise ExperimentNotFound(
                f"no trials of sweep {sweep!r} in MLflow experiment {experiment!r} at {client.tracking_uri} "
                f"(its sweeps: {', '.join(known) or 'none'}); pass --sweep with the id `pyflyte run "
                "workflows/sweep.py` printed, or leave --sweep out to compare every pipeline run")
        runs = trials
    return sorted(runs, key=lambda r: r.info.start_time)


def run_label(run: Any) -> str:
    """A run in tables and legends: its id's start, and a sweep trial's number and values."""
    tags = run.data.tags
    return f"{run.info.run_id[:8]} trial {tags['sweep.trial']}" if "sweep.trial" in tags else run.info.run_id[:8]


def stage_run(client: Any, parent: Any, stage: str) -> Optional[Any]:
    """The stage run nested under a pipeline run; a cached stage points to the run that computed it."""
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                             f"and tags.`qloraflow.stage` = '{stage}'", max_results=1)
    return found[0] if found else None


def comparison_table(runs: list[Any], params: list[str], metrics: list[str], sort: Optional[str],
                     descending: bool = True) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        row = {"run": r.info.run_id[:8], "execution": r.data.tags.get("flyte.execution_id", "")}
        if any("sweep.trial" in x.data.tags for x in runs):
            row["trial"] = r.data.tags.get("sweep.label", "")
        row.update({p: r.data.params.get(p, "") for p in params})
        row.update({m: r.data.metrics.get(m) for m in metrics})
        rows.append(row)
    if sort:
        missing = float("-inf") if descending else float("inf")
        rows.sort(key=lambda x: x.get(sort) if isinstance(x.get(sort), (int, float)) else missing, reverse=descending)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no pipeline runs)"
    cols = list(rows[0])
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plot(client: Any, runs: list[Any], metrics: list[str], out_png: str) -> str:
    """Loss curves of each run's training stage and a bar chart of the chosen metrics, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        train = stage_run(client, r, "train")
        if train is None:
            continue
        history = sorted(client.get_metric_history(train.info.run_id, "loss"), key=lambda m: m.step)
        left.plot([m.step for m in history], [m.value for m in history], label=run_label(r))
    left.set(title="train loss", xlabel="step", ylabel="loss")
    left.legend(fontsize=8)
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        values = [r.data.metrics.get(m, 0.0) for m in metrics]
        right.bar([j + i * width for j in range(len(metrics))], values, width, label=run_label(r))
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=20, fontsize=8)
    right.set(title="eval metrics")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def add_compare_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``qloraflow compare``, on ``ap`` (the CLI's subparser, or ``build_parser``'s own)."""
    ap.add_argument("--experiment", required=True, help="MLflow experiment of the pipeline runs "
                    "(the config's tracking.experiment, e.g. qloraflow-demo)")
    ap.add_argument("--tracking-uri", metavar="URI", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    ap.add_argument("--params", nargs="*", default=DEFAULT_PARAMS, metavar="PARAM",
                    help=f"run params to show as columns (default: {' '.join(DEFAULT_PARAMS)})")
    ap.add_argument("--metrics", nargs="*", default=DEFAULT_METRICS, metavar="METRIC",
                    help=f"run metrics to show and plot (default: {' '.join(DEFAULT_METRICS)})")
    ap.add_argument("--sweep", default=None, metavar="RUN", help="only the trials of this sweep (its MLflow run id, "
                    "or its first characters, as workflows/sweep.py prints it)")
    ap.add_argument("--sort", default=None, help="a metric or param to sort by (descending)")
    ap.add_argument("--ascending", action="store_true", help="sort ascending instead")
    ap.add_argument("--out", default="compare.png", help="PNG with loss curves and metric bars (default: %(default)s)")
    return ap


DESCRIPTION = "Compare pipeline runs of an MLflow experiment: a table, loss curves and eval bars."


def build_parser() -> argparse.ArgumentParser:
    return add_compare_arguments(argparse.ArgumentParser(prog="qloraflow compare", description=DESCRIPTION))


def run_compare(args: argparse.Namespace) -> int:
    """Print the table of ``args.experiment``'s pipeline runs and write the plot.

    ``args`` holds the options ``add_compare_arguments`` defines (parsed by the CLI or ``compare_main``).
    """
    from mlflow.tracking import MlflowClient

    from qloraflow.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    client = MlflowClient(uri)
    runs = pipeline_runs(client, args.experiment, args.sweep)
    print(format_table(comparison_table(runs, args.params, args.metrics, args.sort, not args.ascending)))
    if runs:
        print(f"wrote {os.path.abspath(plot(client, runs, args.metrics, args.out))}")
    return 0


def compare_main(argv: Optional[list[str]] = None) -> int:
    return run_compare(build_parser().parse_args(argv))
