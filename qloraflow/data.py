"""The data stage: ingest -> clean -> check -> dedupe -> split -> write, with a report.

One call does it all and is what the Flyte task runs::

    from qloraflow.config import load_config
    from qloraflow.data import prepare_dataset
    report = prepare_dataset(load_config("configs/tiny.yaml").data, "outputs/data", seed=42)

The output folder then holds ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns
``id``, ``source``, ``format``, ``messages``), ``quarantine.jsonl`` (one line per rejected record:
source, line, reason, detail, raw, duplicate_of) and ``report.json``. Every record read is either
in a split or in the quarantine. Each file appears under its final name only once complete.
``qloraflow.shard`` runs the same stage over shards of the inputs (a Flyte map task), to the same bytes.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from qloraflow.clean import check_messages, clean_messages
from qloraflow.config import DataConfig, result_settings
from qloraflow.dedupe import EXACT_DUPLICATE, DedupeResult, dedupe_texts
from qloraflow.errors import DataValidationError, EmptyDatasetError
from qloraflow.files import write_atomic
from qloraflow.minhash import short_text_keys
from qloraflow.ingest import Record, Rejected, input_files, meta_json, read_source

SPLITS = ("train", "validation", "test")
LENGTH_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
NEAR_DUP_EXAMPLES = 10
MINHASH_SEED = 1  # datasketch's default permutation seed


def content_hash(paths: list[str]) -> str:
    """sha256 over the inputs' bytes, for cache keys.

    Files are hashed in the order given; a folder over its files in sorted order, each with its
    path relative to the folder; an ``hf:`` Hub name by the name itself (pin the data by saving it
    to disk). Lengths are hashed too, so moving bytes between files changes the result.

    Raises:
        DataValidationError: An input does not exist.
    """
    h = hashlib.sha256()
    for spec in paths:
        h.update(f"input\0{len(spec)}\0".encode())
        if spec.startswith("hf:"):
            h.update(spec.encode())
            continue
        path = Path(spec)
        if not path.exists():
            raise DataValidationError(f"{spec}: input file not found; check data.train_files / data.test_files")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            name = f.relative_to(path).as_posix() if path.is_dir() else ""
            h.update(f"file\0{name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def record_id(messages: list[dict[str, str]]) -> str:
    """Content hash of a cleaned record: equal messages, equal id, whatever file they came from."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]


def assign_split(rid: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Split of a record from its own id and the seed only, so appending records moves none."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{rid}".encode()).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


def _read_all(specs: list[str], fmt: str) -> tuple[list[Record], list[Rejected]]:
    records: list[Record] = []
    rejected: list[Rejected] = []
    for spec in specs:
        for source, kind in input_files(spec):
            for item in read_source(source, kind, fmt):
                (records if isinstance(item, Record) else rejected).append(item)
    return records, rejected


def _token_counts(tokenizer: Any, texts: list[str], batch: int = 512) -> list[int]:
    counts: list[int] = []
    for i in range(0, len(texts), batch):
        counts += [len(ids) for ids in tokenizer(texts[i: i + batch], add_special_tokens=False)["input_ids"]]
    return counts


def _quarantine_line(source: str, line: int, reason: str, detail: str, raw: Any,
                     duplicate_of: Optional[str] = None, similarity: Optional[float] = None) -> dict[str, Any]:
    entry = {"source": source, "line": line, "reason": reason, "detail": detail, "raw": raw,
             "duplicate_of": duplicate_of}
    if similarity is not None:
        entry["similarity"] = round(similarity, 4)
    return entry


def record_text(messages: list[dict[str, str]]) -> str:
    """The text of a record that is measured, tokenized and deduplicated: its turns, one per line."""
    return "\n".join(m["content"] for m in messages)


def answer_keys(cfg: DataConfig, messages: list[list[dict[str, str]]]) -> Optional[list[int]]:
    """Per record, the key of its answer when shorter than ``data.near_dup_short_answer_words``
    (see :func:`qloraflow.minhash.short_text_keys`): records with different short answers are never
    near duplicates. None when the setting is off."""
    if cfg.near_dup_short_answer_words <= 0:
        return None
    answers = ["\n".join(m["content"] for m in msgs if m["role"] == "assistant") for msgs in messages]
    return short_text_keys(answers, cfg.near_dup_short_answer_words)


@dataclass
class CheckedRecords:
    """Every row read, in input order (test inputs first), converted, cleaned and checked.

    What the decisions that need all records at once (dedupe, split, quarantine, report) start
    from: :func:`prepare_dataset` builds it in one process, ``qloraflow.shard`` from shards.

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


def check_records(cfg: DataConfig, records: list[Record], *, tokenizer: Any = None, max_tokens: Optional[int] = None
                  ) -> tuple[list[list[dict[str, str]]], list[Optional[int]], list[Optional[tuple[str, str]]]]:
    """Clean every record and check it: ``(cleaned messages, token counts, problems)``, per record.

    Args and token counting as in :func:`prepare_dataset`.
    """
    cleaned = [clean_messages(r.messages, redact=cfg.redact_pii) for r in records]
    texts = [record_text(msgs) for msgs in cleaned]
    tokens = _token_counts(tokenizer, texts) if tokenizer is not None else [None] * len(records)
    problems = [check_messages(msgs, min_output_chars=cfg.min_output_chars, max_chars=cfg.max_chars,
                               max_repetition=cfg.max_repetition, n_tokens=n, max_tokens=max_tokens)
                for msgs, n in zip(cleaned, tokens)]
    return cleaned, tokens, problems


def prepare_dataset(cfg: DataConfig, out_dir: Union[str, Path], seed: int = 0, *, tokenizer: Any = None,
                    max_tokens: Optional[int] = None, distinct_numbers: bool = True,
                    num_workers: Optional[int] = None) -> dict[str, Any]:
    """Read, clean, check, deduplicate and split the configured inputs; write them and a report.

    Test inputs are deduplicated first and kept whole (only duplicates within them go), so a train
    record that copies a test record is the one removed.

    Args:
        cfg: The ``data`` section (:class:`qloraflow.config.DataConfig`).
        out_dir: Output folder (created if missing).
        seed: Seed of the hash split.
        tokenizer: Optional tokenizer; with ``max_tokens`` records over that many tokens (contents
            only, no template) are rejected, and the report gets token histograms.
        max_tokens: Token limit per record (needs ``tokenizer``).
        distinct_numbers: Records that differ only in numbers are not near duplicates.
        num_workers: Processes that compute MinHash signatures (default: every CPU, from 5,000 records).

    Returns:
        The report (also written to ``report.json``).

    Raises:
        DataValidationError: An input is missing or unreadable, or more than
            ``data.max_reject_rate`` of the records were rejected.
        EmptyDatasetError: No training record (or, with test files, no test record) is left.
    """
    check_inputs_exist(list(cfg.test_files) + list(cfg.train_files))

    # Load: test inputs first, so that they win every duplicate contest.
    test_records, test_rejected = _read_all(list(cfg.test_files), cfg.format)
    train_records, train_rejected = _read_all(list(cfg.train_files), cfg.format)
    records = test_records + train_records
    checked = CheckedRecords(records, [True] * len(test_records) + [False] * len(train_records),
                             test_rejected + train_rejected,
                             *check_records(cfg, records, tokenizer=tokenizer, max_tokens=max_tokens))

    # Dedupe across test and train together, in that order.
    fit = checked.fit
    ids = [record_id(checked.cleaned[i]) for i in fit]
    dd = dedupe_texts([record_text(checked.cleaned[i]) for i in fit], exact_keys=ids,
                      threshold=cfg.near_dup_threshold, num_perm=cfg.minhash_num_perm,
                      shingle_size=cfg.shingle_size, distinct_numbers=distinct_numbers,
                      shared_line_records=cfg.near_dup_shared_line_records,
                      distinct_keys=answer_keys(cfg, [checked.cleaned[i] for i in fit]),
                      num_workers=num_workers, seed=MINHASH_SEED)
    return write_dataset(cfg, out_dir, seed, checked, ids, dd)


def write_dataset(cfg: DataConfig, out_dir: Union[str, Path], seed: int, checked: CheckedRecords, ids: list[str],
                  dd: DedupeResult) -> dict[str, Any]:
    """Split the records that are kept, and write the splits, the quarantine and the report.

    Args:
        cfg: The ``data`` section.
        out_dir: Output folder (created if missing).
        seed: Seed of the hash split.
        checked: Every row, checked.
        ids: :func:`record_id` of each record in ``checked.fit``, in that order.
        dd: The deduplication of ``checked.fit``, in that order.

    Returns and Raises: as :func:`prepare_dataset`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    kept_mask = dd.kept.tolist()
    for k, i in enumerate(fit):
        r = records[i]
        if not kept_mask[k]:
            j = fit[int(dd.duplicate_of[k])]
            kept = records[j]
            leaks += is_test_input[j] and not is_test_input[i]
            sim = float(dd.similarity[k])
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
    report = _report(cfg, seed, records, quarantine, rows, lengths, token_lengths, examples, leaks, dd)
    write_atomic(out / "quarantine.jsonl", lambda p: _write_jsonl(p, quarantine))
    write_atomic(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2, default=str)))
    try:
        _fail_if_unusable(cfg, report, out)
    except DataValidationError:
        for split in SPLITS:  # a stale split from an earlier run must not pass for this one's
            (out / f"{split}.parquet").unlink(missing_ok=True)
        raise
    for split in SPLITS:
        write_atomic(out / f"{split}.parquet", lambda p, s=split: _write_parquet(p, rows[s]))
    return report


def check_inputs_exist(specs: list[str]) -> None:
    """Raise one :class:`DataValidationError` naming every input that does not exist."""
    missing = [s for s in specs if not s.startswith("hf:") and not Path(s).exists()]
    if missing:
        raise DataValidationError(f"input file(s) not found: {', '.join(missing)}; check data.train_files / "
                                  f"data.test_files (relative paths are read from {Path.cwd()})")


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
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;max-width:40em}"
             ".bar{display:inline-block;height:0.8em;background:#4a7bd0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data stage report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


class _Html(str):
    """Markup made here, inserted unescaped."""
