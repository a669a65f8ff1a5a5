"""HTML reports of each stage, for Flyte Decks and for people: self-contained pages, no scripts.

Each function takes what its stage already returns and renders only that stage's numbers::

    html = train_html(summary, log_history)      # loss and eval-loss curves, learning rate, speed, memory
    html = tokenize_html(report)                 # lengths, truncation, packing per split
    html = merge_html(info)                      # the merge check's numbers
    html = deploy_html(report)                   # the smoke answers, latency percentiles

Curves are inline SVG, so a Deck renders without network access or plotting libraries.
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Optional, Sequence


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def table_html(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A table of ``rows`` (one dict per row), columns in the order given or of first appearance."""
    if not rows:
        return "<p>(nothing)</p>"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"


def pairs_html(values: dict[str, Any]) -> str:
    """A two-column table: name, value."""
    return table_html([{"": k, "value": v} for k, v in values.items()])


def line_chart_svg(series: dict[str, list[tuple[float, float]]], title: str, width: int = 560, height: int = 220) -> str:
    """Line chart of named (x, y) series, each point labelled at both ends with its value."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no points</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 40

    def at(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad))

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{pad}" y="14">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad / 2}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{pad}" y="{height - pad + 14}">{x0:g}</text>',
             f'<text x="{width - pad - 20}" y="{height - pad + 14}">{x1:g}</text>',
             f'<text x="2" y="{height - pad}">{y0:.3g}</text>', f'<text x="2" y="{pad / 2 + 8}">{y1:.3g}</text>']
    for n, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        colour = colours[n % len(colours)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in pts))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        for x, y in (pts[0], pts[-1]):
            a, b = at(x, y)
            parts.append(f'<text x="{a + 3:.1f}" y="{b - 3:.1f}" fill="{colour}">{y:.3g}</text>')
        parts.append(f'<text x="{width - pad - 90}" y="{14 + 12 * n}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _series(history: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(h.get("step", i)), float(h[key])) for i, h in enumerate(history) if isinstance(h.get(key), (int, float))]


def train_html(summary: dict[str, Any], log_history: Sequence[dict[str, Any]]) -> str:
    """Training: loss and eval-loss curves, the learning rate, speed and memory."""
    history = list(log_history)
    keep = ("backend", "global_step", "train_loss_first", "train_loss_last", "best_eval_loss", "train_seconds",
            "tokens_seen", "tokens_per_s", "trainable_params", "compute_dtype", "world_size", "resumed_from")
    memory = {k: v for k, v in summary.items() if "memory" in k or k.startswith("peak_")}
    return ("<h3>Training</h3>"
            + line_chart_svg({"train loss": _series(history, "loss"), "eval loss": _series(history, "eval_loss")},
                             "loss by step")
            + line_chart_svg({"learning rate": _series(history, "learning_rate")}, "learning rate by step")
            + pairs_html({k: summary.get(k) for k in keep if k in summary})
            + ("<h4>Memory</h4>" + pairs_html(memory) if memory else ""))


def tokenize_html(report: dict[str, Any]) -> str:
    """Tokenize: per split rows, tokens, trained tokens, truncation and packing, and the masking method."""
    rows = [{"split": split, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}}
            for split, r in report.get("splits", {}).items()]
    masking = report.get("masking")
    return ("<h3>Tokenize</h3>" + table_html(rows)
            + (f"<h4>Masking</h4>{pairs_html(masking)}" if isinstance(masking, dict) else ""))


def merge_html(info: dict[str, Any]) -> str:
    """Merge: the weight check, the output check against one more rounding, and the merged model's metrics."""
    v = info.get("verify", {})
    weights = {k: val for k, val in v.get("weights", {}).items() if not isinstance(val, (list, dict))}
    outputs = [{"comparison": "base + adapter vs merged", **v.get("outputs", {})},
               {"comparison": "one more rounding (the floor)", **v.get("rounding", {})}]
    return ("<h3>Merge</h3>" + pairs_html({"merged bytes": info.get("bytes"), "dtype": info.get("dtype"),
                                           "merge seconds": info.get("merge_seconds"),
                                           "verify seconds": info.get("verify_seconds"),
                                           "KL bound": v.get("kl_bound")})
            + "<h4>Weights (ulp of bf16 rounding)</h4>" + pairs_html(weights)
            + "<h4>Outputs on held-out answer positions</h4>" + table_html(outputs)
            + ("<h4>Merged model, held-out</h4>" + pairs_html(info["metrics"]) if info.get("metrics") else ""))


def deploy_html(report: dict[str, Any]) -> str:
    """Deploy: pass or fail, latency percentiles, agreement with HF generate, the first answers."""
    if report.get("skipped"):
        return f"<h3>Deploy</h3><p>skipped: {html.escape(str(report['skipped']))}</p>"
    answers = [{"answer": a} for a in (report.get("chat_answers") or [])[:10]]
    latency: dict[str, Any] = {}
    for k, v in (report.get("latency") or {}).items():
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            ordered = sorted(v)
            latency.update({f"{k} p50": ordered[len(ordered) // 2], f"{k} p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                            f"{k} requests": len(ordered)})
        elif isinstance(v, (int, float)):
            latency[k] = v
    agreement = report.get("hf_agreement") or {}
    return ("<h3>Deploy</h3>" + pairs_html({"smoke test": "passed" if report.get("passed") else "FAILED",
                                            "answers equal to HF generate": agreement.get("share")})
            + "<h4>Latency</h4>" + pairs_html(latency) + "<h4>First answers</h4>" + table_html(answers))
