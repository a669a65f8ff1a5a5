"""What a person reads of an evaluation: the comparison plot, the samples table, the evaluation page.

The models are the rows of the pipeline summary (base, candidate, merged, champion, whichever are
present); each takes the metrics ``qloraflow.evaluate`` computed and the samples it answered::

    from qloraflow.comparison import comparison_png, evaluation_html, samples_table
    comparison_png({"base": {...}, "candidate": {...}}, "comparison.png")  # one axis per metric
    table = samples_table({"base": base_samples, "candidate": candidate_samples})
    tracker.log_table(table, "eval_samples.json")  # sortable by any column in MLflow's artifact view
    html = evaluation_html(metrics, table, png_bytes)

Each metric gets its own axis and scale: a held-out loss of 13.3 beside an exact match of 0.8 on one
fixed 0-1 axis would be clipped without a hint.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any, Optional, Sequence

from qloraflow.evaluate import exact_match

# The order a reader compares in: before fine-tuning, the adapter, what is served, what serves now.
MODEL_ORDER = ("base", "candidate", "merged", "champion")
COLOURS = {"base": "#7f7f7f", "candidate": "#1f77b4", "merged": "#2ca02c", "champion": "#ff7f0e"}


def _models(results: dict[str, dict[str, float]]) -> list[str]:
    present = [m for m in MODEL_ORDER if results.get(m)]
    return present + [m for m in results if results.get(m) and m not in present]


def _metrics(results: dict[str, dict[str, float]]) -> list[str]:
    return sorted({k for m in results.values() for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})


def comparison_figure(results: dict[str, dict[str, float]]) -> Any:
    """Small multiples: one axis per metric, each on its own scale, a labelled bar per model.

    Args:
        results: model name (base, candidate, merged, champion) -> metric -> value. Models without
            metrics (no champion yet) are left out.

    Returns:
        The matplotlib figure; ``fig.axes[i].get_title()`` is the i-th metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, metrics = _models(results), _metrics(results)
    cols = min(4, max(len(metrics), 1))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        fig.delaxes(ax)
    for ax, metric in zip(axes.flat, metrics):
        values = [results[m].get(metric) for m in models]
        shown = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(range(len(models)), shown, color=[COLOURS.get(m, "#9467bd") for m in models])
        for bar, v in zip(bars, values):
            label = "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        low, high = min(shown + [0.0]), max(shown + [0.0])
        span = (high - low) or 1.0
        ax.set_ylim(low - (0.12 * span if low < 0 else 0), high + 0.18 * span)  # room for the labels
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("held-out metrics, each on its own scale", fontsize=10)
    fig.tight_layout()
    return fig


def comparison_png(results: dict[str, dict[str, float]], path: str | os.PathLike) -> str:
    """:func:`comparison_figure` as a PNG; its ``Description`` text chunk lists the metrics and models."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(results)
    description = json.dumps({"metrics": _metrics(results), "models": _models(results), "axes": len(fig.axes)})
    fig.savefig(path, dpi=100, metadata={"Title": "qloraflow comparison", "Description": description})
    plt.close(fig)
    return str(path)


def question_of(sample: dict[str, Any]) -> str:
    """The user's last message: what was asked, without the chat template around it."""
    users = [m.get("content", "") for m in sample.get("messages") or [] if m.get("role") == "user"]
    return users[-1] if users else sample.get("prompt", "")


def samples_table(samples: dict[str, Sequence[dict[str, Any]]]) -> dict[str, list]:
    """One row per test record: id, question, reference, and per model its answer and verdict.

    The verdict is ``match`` when the answer equals the reference after whitespace folding (what
    ``exact_match`` counts), else ``mismatch``. Rows follow the first model's order; the other models'
    samples are matched by record id (by position for samples without one).

    Returns:
        Columns (name -> values), as ``mlflow.log_table`` takes them.
    """
    models = _models({m: {"n": 1.0} for m, s in samples.items() if s})
    if not models:
        return {"id": [], "question": [], "reference": []}
    first = list(samples[models[0]])
    table: dict[str, list] = {"id": [str(s.get("id", "")) for s in first],
                              "question": [question_of(s) for s in first],
                              "reference": [s["reference"] for s in first]}
    for m in models:
        answers = _aligned(first, list(samples[m]))
        table[f"{m} answer"] = [a["answer"] if a else "" for a in answers]
        table[f"{m} verdict"] = [("match" if exact_match(a["answer"], ref) else "mismatch") if a else "missing"
                                 for a, ref in zip(answers, table["reference"])]
    return table


def _aligned(first: list[dict], others: list[dict]) -> list[Optional[dict]]:
    """``others`` in the order of ``first``: by record id, by position where a sample has no id."""
    by_id = {str(s["id"]): s for s in others if s.get("id")}
    return [by_id.get(str(s["id"])) if s.get("id") else (others[i] if i < len(others) else None)
            for i, s in enumerate(first)]


PAGE_STYLE = """<style>
.qf { font-family: sans-serif; font-size: 13px; max-width: 1360px; }
.qf table { border-collapse: collapse; }
.qf td, .qf th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
.qf .samples { max-width: 100%; max-height: 640px; overflow: auto; }
.qf .samples table { table-layout: fixed; width: 100%; }
.qf .samples td { overflow-wrap: anywhere; white-space: pre-wrap; font-family: monospace; font-size: 12px; }
.qf .match { background: #e6f4e6; } .qf .mismatch { background: #fbe9e9; }
.qf img { max-width: 100%; height: auto; }
</style>"""


def evaluation_html(results: dict[str, dict[str, float]], table: dict[str, list], png: Optional[bytes] = None,
                    limit: int = 50) -> str:
    """The evaluation page (a Flyte Deck): metric table, the comparison plot inline, the samples.

    Fits a 1,400 px window: long answers wrap inside their cells and the samples scroll inside
    their own box.
    """
    models, metrics = _models(results), _metrics(results)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(
        f"<td>{results[m][k]:.4g}</td>" if isinstance(results[m].get(k), (int, float)) else "<td></td>"
        for m in models) + "</tr>" for k in metrics)
    plot = (f'<img alt="comparison" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else "")
    columns = list(table)
    n = len(table.get("id", []))
    widths = {"id": "6%", "question": "22%", "reference": "16%"}
    cols = "".join(f'<col style="width:{widths.get(c, "auto" if c.endswith("answer") else "7%")}">' for c in columns)
    rows = []
    for i in range(min(n, limit)):
        cells = []
        for c in columns:
            v = str(table[c][i])
            cls = f' class="{v}"' if c.endswith("verdict") and v in ("match", "mismatch") else ""
            cells.append(f"<td{cls}>{html.escape(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    matches = {m: sum(v == "match" for v in table.get(f"{m} verdict", [])) for m in models}
    shown = f"first {limit} of {n}" if n > limit else f"all {n}"
    return (f'{PAGE_STYLE}<div class="qf"><h3>Evaluation</h3><table><tr><th>metric</th>{head}</tr>{body}</table>'
            f"{plot}<h3>Samples ({shown}; the whole table is eval_samples.json in the stage's MLflow run)</h3>"
            f"<p>verdict: the answer equals the reference after whitespace folding. Matches: "
            + ", ".join(f"{html.escape(m)} {k}/{n}" for m, k in matches.items())
            + f'</p><div class="samples"><table><colgroup>{cols}</colgroup><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(rows) + "</table></div></div>")


def paired_tests_html(tests: dict[str, dict[str, Any]]) -> str:
    """The paired tests of the evaluation (``qloraflow.paired.PairedTest.as_dict()``) as an HTML table."""
    if not tests:
        return ""
    columns = ("n", "difference", "lower", "upper", "p_value", "method")
    rows = "".join(f"<tr><td>{html.escape(what)}</td>" + "".join(f"<td>{html.escape(str(t.get(c)))}</td>"
                                                               for c in columns) + "</tr>"
                   for what, t in tests.items())
    return ("<h3>Paired tests (matched by record id)</h3><table border=1><tr><th>comparison</th>"
            + "".join(f"<th>{c}</th>" for c in columns) + f"</tr>{rows}</table>")


def gate_html(decision: dict[str, Any], gate_metric: str) -> str:
    """The promotion gate's decision (``qloraflow.registry.promote``) as an HTML section: promoted or not and
    why, and per side (base, champion) the difference, its interval, p-value, n and how it was compared."""
    promoted = bool(decision.get("promoted"))
    columns = ("candidate", "reference", "difference", "lower", "upper", "confidence", "p_value", "n", "method",
               "source", "passed")
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = "".join(f"<tr><td>{html.escape(str(t.get('against', side)))}</td>"
                   + "".join(f"<td>{html.escape(cell(t.get(c)))}</td>" for c in columns) + "</tr>"
                   for side, t in (decision.get("tests") or {}).items())
    table = ("<table border=1><tr><th>against</th>" + "".join(f"<th>{c}</th>" for c in columns)
             + f"</tr>{rows}</table>") if rows else ""
    return (f"<h3>Promotion gate on {html.escape(gate_metric)}: "
            f"{'promoted' if promoted else 'not promoted'}</h3>"
            f"<p>{html.escape(str(decision.get('reason', '')))}</p>{table}")
