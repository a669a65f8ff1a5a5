"""HTML reports of each stage, for Flyte Decks and for people: self-contained pages, no scripts.

Each function takes what its stage already returns and renders only that stage's numbers::

    html = train_html(summary, log_history)      # loss and eval-loss curves, learning rate, speed, memory
    html = tokenize_html(report)                 # lengths, truncation, packing per split, a length histogram
    html = merge_html(info)                      # the merge check's numbers
    html = deploy_html(report)                   # the smoke answers, latency percentiles
    page = page_html("train", html)              # a whole page, as kept under outputs/<name>/decks/

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
    return (f'<table border=1 cellpadding=3 style="border-collapse:collapse;max-width:100%">'
            f"<tr>{head}</tr>{body}</table>")


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


def bar_chart_svg(edges: Sequence[float], counts: Sequence[int], title: str, width: int = 560,
                  height: int = 200) -> str:
    """A histogram: one bar per bin between consecutive ``edges``, each labelled with its count."""
    if not counts or not any(counts):
        return f"<p>{html.escape(title)}: no values</p>"
    pad, top = 40, max(counts)
    step = (width - 2 * pad) / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">',
             f'<text x="{pad}" y="12">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>']
    for i, n in enumerate(counts):
        h = (height - 2 * pad) * n / top
        x, y = pad + i * step, height - pad - h
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{step - 2:.1f}" height="{h:.1f}" fill="#1f77b4"/>')
        if n:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{y - 2:.1f}" text-anchor="middle">{n}</text>')
    for i in (0, len(counts) // 2, len(counts)):
        parts.append(f'<text x="{pad + i * step:.1f}" y="{height - pad + 12}" text-anchor="middle">{edges[i]:g}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 8}" text-anchor="middle">tokens per example</text></svg>')
    return "".join(parts)


def page_html(stage: str, body: str) -> str:
    """A stage's Deck tabs as one whole page, readable in a browser without Flyte."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>qloraflow {html.escape(stage)}</title>'
            f'</head><body style="font-family:sans-serif;max-width:1360px;margin:12px">{body}</body></html>')


def _series(history: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(h.get("step", i)), float(h[key])) for i, h in enumerate(history) if isinstance(h.get(key), (int, float))]


def train_html(summary: dict[str, Any], log_history: Sequence[dict[str, Any]]) -> str:
    """Training: loss and eval-loss curves, the learning rate, speed and memory."""
    history = list(log_history)
    keep = ("backend", "global_step", "train_loss_first", "train_loss_last", "best_eval_loss", "train_seconds",
            "tokens_seen", "tokens_per_s", "trainable_params", "compute_dtype", "world_size", "resumed_from")
    memory = {k: v for k, v in summary.items() if "memory" in k or k.startswith("peak_") or k.endswith("_gib")}
    return ("<h3>Training</h3>"
            + line_chart_svg({"train loss": _series(history, "loss"), "eval loss": _series(history, "eval_loss")},
                             "loss by step")
            + line_chart_svg({"learning rate": _series(history, "learning_rate")}, "learning rate by step")
            + pairs_html({k: summary.get(k) for k in keep if k in summary})
            + ("<h4>Memory</h4>" + pairs_html(memory) if memory else ""))


def tokenize_html(report: dict[str, Any]) -> str:
    """Tokenize: per split rows, tokens, trained tokens, truncation, packing efficiency and example lengths;
    a histogram of the example lengths per split; the masking method."""
    splits = report.get("splits", {})
    rows = [{"split": split, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}}
            for split, r in splits.items()]
    hists = "".join(bar_chart_svg(r["length_histogram"]["edges"], r["length_histogram"]["counts"],
                                  f"{split}: example lengths (after the length policy, before packing)")
                    for split, r in splits.items() if isinstance(r.get("length_histogram"), dict))
    masking = report.get("masking")
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in report.get("notes") or [])
    return ("<h3>Tokenize</h3>" + table_html(rows)
            + (f"<h4>Lengths</h4>{hists}" if hists else "")
            + (f"<h4>Masking</h4>{pairs_html(masking)}" if isinstance(masking, dict) else "")
            + (f"<h4>Notes</h4><ul>{notes}</ul>" if notes else ""))


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


def latency_percentiles(latency: dict[str, Any]) -> dict[str, float]:
    """p50 and p95 (nearest rank) and the request count of each list of latencies; scalars as they are."""
    out: dict[str, float] = {}
    for k, v in (latency or {}).items():
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            ordered = sorted(v)
            name = k.removesuffix("_s")
            out.update({f"{name}_p50_s": ordered[len(ordered) // 2],
                        f"{name}_p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                        f"{name}_requests": len(ordered)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def deploy_html(report: dict[str, Any], questions: Sequence[str] = ()) -> str:
    """Deploy: pass or fail, latency percentiles, agreement with HF generate, the first answers."""
    if report.get("skipped"):
        return f"<h3>Deploy</h3><p>skipped: {html.escape(str(report['skipped']))}</p>"
    answers = [{"question": q, "served answer": a}
               for q, a in zip(list(questions) or [""] * 10, (report.get("chat_answers") or [])[:10])]
    agreement = report.get("hf_agreement") or {}
    tokens = report.get("served_tokens") or {}
    smoke = report.get("smoke_passed", report.get("passed"))
    # Each answer that differs from HF generate's: where the served one left the merged model's float32 choice.
    differ = [{"id": m["id"], "position": (m.get("first_divergence") or {}).get("position"),
               "served token": (m.get("first_divergence") or {}).get("served_token"),
               "merged token": (m.get("first_divergence") or {}).get("merged_token"),
               "margin (logits)": (m.get("first_divergence") or {}).get("margin"),
               "worst margin (near-tie steps)": m.get("worst_margin_ulps")} for m in agreement.get("mismatches", [])]
    return ("<h3>Deploy</h3>" + pairs_html({
                "smoke test": "passed" if smoke else "FAILED",
                "served tokens = merged model's choice up to near-ties": (
                    None if not tokens else "yes" if tokens.get("passed") else f"NO: {tokens.get('failed')}"),
                "worst served-token margin (near-tie steps; passes up to)": (
                    None if not tokens else f"{tokens.get('worst_margin_ulps')} ({tokens.get('near_tie_ulps')})"),
                "answers equal to HF generate": agreement.get("share")})
            + ("<h4>Answers that differ from HF generate</h4>" + table_html(differ, list(differ[0])) if differ else "")
            + "<h4>Latency (seconds per request)</h4>" + pairs_html(latency_percentiles(report.get("latency") or {}))
            + "<h4>First answers</h4>" + table_html(answers, ["question", "served answer"] if questions
                                                     else ["served answer"]))
