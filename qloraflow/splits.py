"""The data stage's last step: split the records that are kept, write the splits, the quarantine and the report.

``qloraflow.data`` decides which records are kept (after checks and deduplication) and hands them
here as :class:`CheckedRecords` with the :class:`qloraflow.dedupe.DedupeResult`; this module puts each
kept record in a split by its own id (:func:`assign_split`), writes ``{train,validation,test}.parquet``
(columns ``id``, ``source``, ``format``, ``messages``, ``meta``), ``quarantine.jsonl`` (one line per
rejected record: source, line, reason, detail, raw, duplicate_of) and ``report.json``, and renders the
report as a page (:func:`report_html`, the task's Deck). Each file appears under its final name only
once complete.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from qloraflow.config import DataConfig, result_settings
from qloraflow.dedupe import EXACT_DUPLICATE, DedupeResult
from qloraflow.errors import DataValidationError, EmptyDatasetError
from qloraflow.files import atomic_folder, raise_if_out_of_space
from qloraflow.ingest import Record, Rejected, meta_json, record_text
from qloraflow.readers import input_files

SPLITS = ("train", "validation", "test")
LENGTH_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
NEAR_DUP_EXAMPLES = 10


def assign_split(rid: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Split of a record from its own id and the seed only, so appending records moves none."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{rid}".encode()).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"



@dataclass
class CheckedRecords:
    """Every row read, in input order (test inputs first), converted, cleaned and checked.

    What the decisions that need all records at once (dedupe, split, quarantine, report) start
    from: ``qloraflow.data.merge_data_shards`` builds it from the shards' records.

    Attributes:
        records: The rows that became records.
        is_test: Per record: read from ``data.test_files``.
        rejected: The rows that could not become records.
        cleaned: Per record: its cleaned messages (only read for records without a problem).
        tokens: Per record: its token count, when a tokenizer was given.
        problems: Per record: ``(reason, detail)`` when unfit to train on, else None.
    """

    records: list[Record]
    is_test: list[bool]
    rejected: list[Rejected]
    cleaned: list[Optional[list[dict[str, str]]]]
    tokens: list[Optional[int]]
    problems: list[Optional[tuple[str, str]]]

    @property
    def fit(self) -> list[int]:
        """Positions of the records without a problem."""
        return [i for i, p in enumerate(self.problems) if p is None]



def write_dataset(cfg: DataConfig, out_dir: Union[str, Path], seed: int, checked: CheckedRecords, ids: list[str],
                  dd: DedupeResult) -> dict[str, Any]:
    """Split the records that are kept, and write the splits, the quarantine and the report.

    Args:
        cfg: The ``data`` section.
        out_dir: Output folder (created if missing).
        seed: Seed of the hash split.
        checked: Every row, checked.
        ids: ``qloraflow.data.record_id`` of each record in ``checked.fit``, in that order.
        dd: The deduplication of ``checked.fit``, in that order.

    Returns:
        The report (also written to ``report.json``).

    Raises:
        DataValidationError: More than ``data.max_reject_rate`` of the records were rejected.
        EmptyDatasetError: No training record (or, with test files, no test record) is left.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    records, is_test_input, cleaned, tokens = checked.records, checked.is_test, checked.cleaned, checked.tokens
    quarantine = [_quarantine_line(r.source, r.line, r.reason, r.detail, r.raw) for r in checked.rejected]
    quarantine += [_quarantine_line(r.source, r.line, problem[0], problem[1], r.raw)
                   for r, problem in zip(records, checked.problems) if problem]
    fit = checked.fit
    texts = {i: record_text(cleaned[i]) for i in fit}
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    token_lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    examples, leaks = [], 0
    copies: dict[int, list[dict[str, Any]]] = {}  # a test input (its position in fit) -> its train copies
    kept_mask = dd.kept.tolist()
    for k, i in enumerate(fit):
        r = records[i]
        if not kept_mask[k]:
            j = fit[int(dd.duplicate_of[k])]
            kept = records[j]
            sim = float(dd.similarity[k])
            if is_test_input[j] and not is_test_input[i]:
                leaks += 1
                copies.setdefault(int(dd.duplicate_of[k]), []).append(
                    {"train": f"{r.source}:{r.line}", "kind": "exact" if dd.reason[k] == EXACT_DUPLICATE else "near",
                     "similarity": round(sim, 4), "train_text": texts[i][:300]})
            what = "exact copy" if dd.reason[k] == EXACT_DUPLICATE else f"near copy (Jaccard {sim:.2f})"
            quarantine.append(_quarantine_line(
                r.source, r.line, dd.reason[k], f"{what} of {kept.source}:{kept.line}, which is kept",
                r.raw, f"{kept.source}:{kept.line}", sim))
            if dd.reason[k] != EXACT_DUPLICATE and len(examples) < NEAR_DUP_EXAMPLES:
                examples.append({"removed": f"{r.source}:{r.line}", "kept": f"{kept.source}:{kept.line}",
                                 "similarity": round(sim, 4), "removed_text": texts[i][:300],
                                 "kept_text": texts[j][:300]})
            continue
        split = "test" if is_test_input[i] else assign_split(
            ids[k], seed, cfg.validation_fraction, 0.0 if cfg.test_files else cfg.test_fraction)
        rows[split].append({"id": ids[k], "source": f"{r.source}:{r.line}", "format": r.format,
                            "messages": cleaned[i], "meta": meta_json(r.meta)})
        lengths[split].append(len(texts[i]))
        if tokens[i] is not None:
            token_lengths[split].append(tokens[i])

    # Quarantine in input order (it was filled stage by stage), so it reads alongside the files.
    rank = {src: k for k, src in enumerate(dict.fromkeys(
        src for spec in [*cfg.test_files, *cfg.train_files] for src, _ in input_files(spec)))}
    quarantine.sort(key=lambda q: (rank[q["source"]], q["line"]))
    quarantine = [truncate_raw(q, cfg.quarantine_max_chars) for q in quarantine]
    report = _report(cfg, seed, records, quarantine, rows, lengths, token_lengths, examples, leaks, dd)
    report["contamination"] = contamination_report(cfg, len(rows["test"]), copies, fit, ids, records, texts)
    try:
        _fail_if_unusable(cfg, report, out)
        failure = None
    except DataValidationError as e:
        failure = e  # the folder still gets the quarantine and the report, which says why; no split
        report["outputs"] = {"quarantine": "quarantine.jsonl", "report": "report.json"}
        report["error"] = str(e)
    # The whole folder at once: a rerun into a used folder replaces it, and a write that fails
    # (a full disk) leaves the old folder as it was, never a report of splits that are not there.
    with atomic_folder(out) as staged:
        _write_file(staged, out, "quarantine.jsonl", lambda p: _write_jsonl(p, quarantine))
        for split in SPLITS if failure is None else ():
            _write_file(staged, out, f"{split}.parquet", lambda p, s=split: _write_parquet(p, rows[s]))
        _write_file(staged, out, "report.json", lambda p: p.write_text(json.dumps(report, indent=2, default=str)))
    if failure is not None:
        raise failure
    return report



def _write_file(staged: Path, out: Path, name: str, write: Any) -> None:
    """``write(staged / name)``; out of room, a :class:`DiskFullError` names ``out / name`` and what it needs."""
    path = staged / name
    try:
        write(path)
    except Exception as e:  # noqa: BLE001 - classified, then raised again
        raise_if_out_of_space(e, out / name, None, written=path.stat().st_size if path.exists() else 0)
        raise


def truncate_raw(entry: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """``entry`` with its ``raw`` cut to ``max_chars`` characters (of its JSON text when not a string),
    and ``raw_chars`` (the full length) and ``raw_truncated`` added when it was longer."""
    raw = entry["raw"]
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    if len(text) <= max_chars:
        return entry
    return {**entry, "raw": text[:max_chars], "raw_chars": len(text), "raw_truncated": True}


def _quarantine_line(source: str, line: int, reason: str, detail: str, raw: Any,
                     duplicate_of: Optional[str] = None, similarity: Optional[float] = None) -> dict[str, Any]:
    entry = {"source": source, "line": line, "reason": reason, "detail": detail, "raw": raw,
             "duplicate_of": duplicate_of}
    if similarity is not None:
        entry["similarity"] = round(similarity, 4)
    return entry



def contamination_report(cfg: DataConfig, n_test: int, copies: dict[int, list[dict[str, Any]]], fit: list[int],
                         ids: list[str], records: list[Record], texts: dict[int, str]) -> dict[str, Any]:
    """The test records that have exact or near copies among the training inputs (the copies are removed).

    Only a test set given apart (``data.test_files``) can be contaminated: a test split carved out by
    hash is cut after deduplication, so copies never cross it.

    Args:
        n_test: Test records kept.
        copies: Per test record (its position in ``fit``), the train records removed as its copies.
        fit, ids, records, texts: As in :func:`write_dataset`.

    Returns:
        Counts, the share of contaminated test records, their ids (sorted) and up to
        ``NEAR_DUP_EXAMPLES`` examples of a test record beside a train copy.
    """
    ordered = sorted(copies)  # input order of the test records
    kinds = [{c["kind"] for c in copies[k]} for k in ordered]
    examples = [{"test_id": ids[k], "test": f"{records[fit[k]].source}:{records[fit[k]].line}",
                 "test_text": texts[fit[k]][:300], **copies[k][0]} for k in ordered[:NEAR_DUP_EXAMPLES]]
    return {"test_source": "data.test_files" if cfg.test_files else "hash split (copies are removed before it)",
            "test_records": n_test, "contaminated_test_records": len(ordered),
            "share": len(ordered) / n_test if n_test else 0.0,
            "with_exact_copy": sum("exact" in k for k in kinds),
            "with_near_copy_only": sum(k == {"near"} for k in kinds),
            "train_copies_removed": sum(len(c) for c in copies.values()),
            "max_test_contamination": cfg.max_test_contamination,
            "test_ids": sorted(ids[k] for k in ordered), "examples": examples}




def _fail_if_unusable(cfg: DataConfig, report: dict[str, Any], out: Path) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in report["rejected_by_reason"].items()) or "none"
    where = f"see {out / 'quarantine.jsonl'} for each rejected record"
    if report["splits"]["train"] == 0:
        raise EmptyDatasetError(
            f"no training record left: read {report['read']} record(s) from {', '.join(cfg.train_files)}, "
            f"rejected {report['rejected']} ({reasons}), {report['splits']['validation']} went to validation, "
            f"{report['splits']['test']} to test; {where}")
    if cfg.test_files and report["splits"]["test"] == 0:
        raise EmptyDatasetError(f"no test record left from {', '.join(cfg.test_files)} ({reasons}); {where}")
    dirty = report["contamination"]
    if dirty["share"] > cfg.max_test_contamination:
        raise DataValidationError(
            f"{dirty['contaminated_test_records']} of {dirty['test_records']} test records ({dirty['share']:.1%}) from "
            f"{', '.join(cfg.test_files)} have exact or near copies in {', '.join(cfg.train_files)}, more than "
            f"data.max_test_contamination={cfg.max_test_contamination}: such a test set measures memorised answers. "
            f"The copies would be removed from training, but the test set itself is suspect; see 'contamination' "
            f"in {out / 'report.json'} for the ids and examples, give a held-out test set, or raise "
            "data.max_test_contamination")
    if report["reject_rate"] > cfg.max_reject_rate:
        raise DataValidationError(
            f"{report['rejected']} of {report['read']} records ({report['reject_rate']:.1%}) were rejected "
            f"({reasons}), more than data.max_reject_rate={cfg.max_reject_rate}; {where}, fix the inputs "
            "or raise data.max_reject_rate")


def _histogram(values: list[int]) -> list[int]:
    counts = [0] * len(LENGTH_EDGES)
    for v in values:
        b = next((k for k in range(len(LENGTH_EDGES) - 1) if v < LENGTH_EDGES[k + 1]), len(LENGTH_EDGES) - 1)
        counts[b] += 1
    return counts


def _report(cfg: DataConfig, seed: int, records: list[Record], quarantine: list[dict], rows: dict, lengths: dict,
            token_lengths: dict, examples: list, leaks: int, dd: Any) -> dict[str, Any]:
    by_reason = Counter(q["reason"] for q in quarantine)
    kept = sum(len(v) for v in rows.values())
    read = kept + len(quarantine)
    sources: dict[str, dict[str, Any]] = {}
    for item in [*records, *quarantine]:
        src = item.source if isinstance(item, Record) else item["source"]
        sources.setdefault(src, {"read": 0, "kept": 0, "rejected": 0, "formats": Counter()})
    for item in records:
        sources[item.source]["formats"][item.format] += 1
    for q in quarantine:
        sources[q["source"]]["rejected"] += 1
    for split_rows in rows.values():
        for row in split_rows:
            sources[row["source"].rsplit(":", 1)[0]]["kept"] += 1
    for s in sources.values():
        s["read"] = s["kept"] + s["rejected"]
        s["formats"] = dict(s["formats"])
    report: dict[str, Any] = {
        "read": read,
        "kept": kept,
        "rejected": len(quarantine),
        "reject_rate": len(quarantine) / read if read else 0.0,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "splits": {s: len(rows[s]) for s in SPLITS},
        "formats": dict(Counter(row["format"] for split_rows in rows.values() for row in split_rows)),
        "sources": sources,
        "dedupe": {"exact_duplicates": by_reason.get("exact_duplicate", 0),
                   "near_duplicates": by_reason.get("near_duplicate", 0),
                   "train_copies_of_test_removed": leaks, "lsh_bands": dd.lsh_params[0],
                   "lsh_rows": dd.lsh_params[1],
                   # Lines that many records share (data.near_dup_shared_line_records) are left out of
                   # the comparison; shared_text_merges: records kept that comparing full texts removes.
                   "shared_lines": dd.shared_lines, "records_with_shared_text": dd.records_with_shared_text,
                   "shared_text_merges": dd.shared_text_merges},
        "length_histogram": {"unit": "characters", "edges": LENGTH_EDGES,
                             **{s: _histogram(lengths[s]) for s in SPLITS}},
        "near_duplicate_examples": examples,
        "seed": seed,
        "config": result_settings(cfg),
        "outputs": {**{s: f"{s}.parquet" for s in SPLITS}, "quarantine": "quarantine.jsonl", "report": "report.json"},
    }
    if any(token_lengths.values()):
        report["token_histogram"] = {"unit": "tokens", "edges": LENGTH_EDGES,
                                     **{s: _histogram(token_lengths[s]) for s in SPLITS}}
    return report


# ----------------------------------------------------------------------------------------------
# Writing


def _write_jsonl(path: Path, entries: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            # Raw rows may hold bytes, dates or lone surrogates: keep them readable, never fail here.
            f.write(json.dumps(e, ensure_ascii=True, default=str) + "\n")


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                        ("messages", pa.list_(message)), ("meta", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# ----------------------------------------------------------------------------------------------
# The report as a page (a Flyte Deck)


def report_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page of the stage report (no scripts, no external resources)."""
    e = html.escape

    def table(head: list[str], body: list[list[Any]]) -> str:
        th = "".join(f"<th>{e(str(h))}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Html) else e(str(c))}</td>" for c in row) + "</tr>"
                      for row in body)
        return f"<table><tr>{th}</tr>{trs}</table>"

    def bar(n: int, total: int) -> _Html:
        width = max(1, round(200 * n / total)) if n and total else 0
        return _Html(f'<span class="bar" style="width:{width}px"></span> {n:,}')

    read = report.get("read", 0)
    parts = [
        "<h1>Data stage report</h1>",
        table(["read", "kept", "rejected", "reject rate"],
              [[f"{read:,}", f"{report.get('kept', 0):,}", f"{report.get('rejected', 0):,}",
                f"{report.get('reject_rate', 0.0):.1%}"]]),
        "<h2>Splits</h2>",
        table(["split", "records"], [[s, bar(n, report.get("kept", 0))] for s, n in report.get("splits", {}).items()]),
        "<h2>Rejected, by reason</h2>",
        table(["reason", "records"], [[r, bar(n, read)] for r, n in report.get("rejected_by_reason", {}).items()]),
        "<h2>Sources</h2>",
        table(["source", "formats", "read", "kept", "rejected"],
              [[s, ", ".join(f"{k} {v}" for k, v in d.get("formats", {}).items()), d["read"], d["kept"], d["rejected"]]
               for s, d in report.get("sources", {}).items()]),
    ]
    for key in ("length_histogram", "token_histogram"):
        hist = report.get(key)
        if not hist:
            continue
        edges = hist["edges"]
        labels = [f"{lo:,}-{hi - 1:,}" for lo, hi in zip(edges, edges[1:])] + [f">= {edges[-1]:,}"]
        splits = [s for s in SPLITS if s in hist]
        peak = max([1] + [c for s in splits for c in hist[s]])
        body = [[label] + [bar(hist[s][b], peak) for s in splits] for b, label in enumerate(labels)]
        parts += [f"<h2>Length ({e(hist['unit'])}) by split</h2>", table([hist["unit"]] + splits, body)]
    examples = report.get("near_duplicate_examples", [])
    if examples:
        parts += ["<h2>Removed near duplicates (examples)</h2>",
                  table(["removed", "kept", "similarity", "removed text", "kept text"],
                        [[x["removed"], x["kept"], x["similarity"], x["removed_text"], x["kept_text"]]
                         for x in examples])]
    dirty = report.get("contamination")
    if dirty:
        parts += ["<h2>Test contamination</h2>",
                  table(["test records", "with train copies", "share", "exact", "near only", "train copies removed",
                         "limit"],
                        [[dirty["test_records"], dirty["contaminated_test_records"], f"{dirty['share']:.1%}",
                          dirty["with_exact_copy"], dirty["with_near_copy_only"], dirty["train_copies_removed"],
                          dirty["max_test_contamination"]]])]
        if dirty["examples"]:
            parts.append(table(["test id", "test", "train copy", "kind", "similarity", "test text", "train text"],
                               [[x["test_id"], x["test"], x["train"], x["kind"], x["similarity"], x["test_text"],
                                 x["train_text"]] for x in dirty["examples"]]))
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;max-width:40em}"
             ".bar{display:inline-block;height:0.8em;background:#4a7bd0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data stage report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


class _Html(str):
    """Markup made here, inserted unescaped."""
