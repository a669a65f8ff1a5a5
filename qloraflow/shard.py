"""The data and tokenize stages over shards: per-record work anywhere, every decision once, in order.

The data stage's costly work is per record: parse, convert, clean, check, count tokens, MinHash.
What needs all records at once (exact and near duplicates, the split, the quarantine's order, the
report) is cheap once the signatures exist. So a plan cuts the inputs into shards of about equal
size (JSONL files at line starts, other inputs whole), each shard is worked on its own (a Flyte
map task runs one pod per shard), and one merge decides over all of them in input order::

    from qloraflow import shard
    plan = shard.plan_data_shards(cfg.data, num_shards=8)
    parts = [shard.prepare_data_shard(cfg.data, s, f"parts/{k}") for k, s in enumerate(plan)]
    report = shard.merge_data_shards(cfg.data, parts, "outputs/data", seed=42)

writes, byte for byte, what ``prepare_dataset(cfg.data, "outputs/data", seed=42)`` writes (a test
holds them equal). A shard cannot know two things, so the merge settles them: where the line
numbers of a JSONL piece start (each piece counts its lines; the merge adds them up), and the
format of an input read with ``format: auto`` (a piece takes the majority of its own rows; the
merge counts the votes of all the input's pieces and redoes any piece that guessed otherwise).

The tokenize stage is split the same way: shards of each split's rows are encoded anywhere, and
the merge applies the length policy and packs each split in data order::

    plan = shard.plan_tokenize_shards("outputs/data", num_shards=8)
    parts = [shard.tokenize_shard(cfg.tokenize, s, "outputs/data", base, f"tok-parts/{k}") for k, s in enumerate(plan)]
    report = shard.merge_tokenize_shards(cfg.tokenize, parts, "outputs/data", base, "outputs/tok")
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from qloraflow.config import DataConfig, TokenizeConfig, result_settings
from qloraflow.data import (MINHASH_SEED, CheckedRecords, answer_keys, check_inputs_exist, check_records, record_id,
                            record_text, write_dataset)
from qloraflow.dedupe import dedupe_signatures, record_signatures
from qloraflow.ingest import Record, Rejected, convert_rows, format_votes, input_files, majority_format, read_rows
from qloraflow.tokenize import SPLITS, encode_parallel, save_split, save_tokenizer

PathLike = Union[str, os.PathLike]
SHARD_FILE = "shard.json"  # written last: a shard folder without it is incomplete
ROWS_FILE = "rows.jsonl"
SIGNATURES_FILE = "signatures.npz"
ENCODED_FILE = "encoded.parquet"


def shard_name(shard: str) -> str:
    """A short name for a shard of a plan, to tell shards' folders apart."""
    return hashlib.sha256(shard.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Data: plan


def plan_data_shards(cfg: DataConfig, num_shards: int) -> list[str]:
    """Cut the inputs into at most ``num_shards`` shards of about equal bytes, in input order.

    A JSONL file is cut at line starts; any other input (JSON, Parquet, CSV, ``datasets``
    folder, Hub name) stays whole in one shard. Only a few bytes around each cut are read.

    Args:
        cfg: The ``data`` section.
        num_shards: Most shards wanted (fewer come back when the inputs cannot be cut finer).

    Returns:
        One JSON string per shard: its pieces, each ``{"input", "source", "kind", "test"}`` plus
        ``"span": [start, stop]`` bytes for JSONL.

    Raises:
        DataValidationError: An input is missing.
    """
    check_inputs_exist(list(cfg.test_files) + list(cfg.train_files))
    inputs = [(source, kind, is_test) for is_test, specs in ((True, cfg.test_files), (False, cfg.train_files))
              for spec in specs for source, kind in input_files(spec)]
    sizes = [_input_size(source, kind) for source, kind, _ in inputs]
    starts = list(itertools.accumulate(sizes, initial=0))
    total = starts[-1]
    offsets = {k * total // num_shards for k in range(1, num_shards)} - {0, total}
    cuts = sorted({_snap(inputs, starts, x) for x in offsets} - {total})
    shards: list[list[dict[str, Any]]] = [[] for _ in range(len(cuts) + 1)]
    for n, ((source, kind, is_test), begin, end) in enumerate(zip(inputs, starts, starts[1:])):
        edges = [begin, *(c for c in cuts if begin < c < end), end]
        for a, b in zip(edges, edges[1:]):
            piece: dict[str, Any] = {"input": n, "source": source, "kind": kind, "test": is_test}
            if kind == "jsonl":
                piece["span"] = [a - begin, b - begin]
            shards[bisect.bisect_right(cuts, a)].append(piece)
    return [json.dumps(s) for s in shards if s]


def _input_size(source: str, kind: str) -> int:
    if kind == "hub":
        return 0
    path = Path(source)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _snap(inputs: list[tuple[str, str, bool]], starts: list[int], offset: int) -> int:
    """The cut nearest after ``offset`` (over all inputs end to end) that splits no row."""
    k = bisect.bisect_right(starts, offset) - 1
    source, kind, _ = inputs[k]
    local = offset - starts[k]
    if local == 0:
        return offset
    if kind != "jsonl":
        return starts[k + 1]
    with open(source, "rb") as f:  # the line start at or after `local`: one past the next newline
        f.seek(local - 1)
        pos = local - 1
        while block := f.read(1 << 16):
            newline = block.find(b"\n")
            if newline >= 0:
                return starts[k] + pos + newline + 1
            pos += len(block)
    return starts[k + 1]


# ----------------------------------------------------------------------------------------------
# Data: one shard


@dataclass
class _Piece:
    """One piece of an input, read, converted, cleaned, checked and MinHashed."""

    spec: dict[str, Any]
    format: str  # what its rows were converted as
    votes: list[list[Any]]  # [format, rows] for format: auto, in order of first appearance
    lines: int  # lines of a JSONL span: where the next piece's line numbers start
    records: list[Record]  # messages: the cleaned ones
    rejected: list[Rejected]
    tokens: list[Optional[int]]
    problems: list[Optional[tuple[str, str]]]
    ids: list[Optional[str]]  # record_id of the records without a problem
    signatures: np.ndarray  # of the records without a problem, in order (record_signatures)
    has: np.ndarray
    numbers: np.ndarray


def prepare_data_shard(cfg: DataConfig, shard: str, out_dir: PathLike, *, tokenizer: Any = None,
                       max_tokens: Optional[int] = None, distinct_numbers: bool = True,
                       num_workers: Optional[int] = None) -> Path:
    """The per-record work of the data stage on one shard of :func:`plan_data_shards`.

    Args:
        cfg: The ``data`` section.
        shard: One shard of the plan.
        out_dir: Receives the shard's rows and signatures (created if missing).
        tokenizer, max_tokens, distinct_numbers, num_workers: As for ``prepare_dataset``.

    Returns:
        ``out_dir``, for :func:`merge_data_shards`.

    Raises:
        DataValidationError: An input as a whole cannot be read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = [_work_piece(cfg, spec, None, tokenizer=tokenizer, max_tokens=max_tokens,
                          distinct_numbers=distinct_numbers, num_workers=num_workers) for spec in json.loads(shard)]
    with open(out / ROWS_FILE, "w", encoding="ascii") as f:
        for p in pieces:
            for r, n, problem, rid in zip(p.records, p.tokens, p.problems, p.ids):
                row = {"line": r.line, "format": r.format, "raw": r.raw, "tokens": n, "problem": problem,
                       "messages": None if problem else r.messages, "id": rid}
                f.write(_json_line(row))
            for r in p.rejected:
                f.write(_json_line({"line": r.line, "reason": r.reason, "detail": r.detail, "raw": r.raw}))
    signatures, has, numbers = _stacked(pieces, cfg.minhash_num_perm)
    np.savez(out / SIGNATURES_FILE, signatures=signatures, has=has, numbers=numbers)
    meta = [{"spec": p.spec, "format": p.format, "votes": p.votes, "lines": p.lines, "records": len(p.records),
             "rejected": len(p.rejected)} for p in pieces]
    (out / SHARD_FILE).write_text(json.dumps({"settings": _settings(cfg, distinct_numbers, max_tokens),
                                              "pieces": meta}, indent=1))
    return out


def _stacked(pieces: list[_Piece], num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces' signatures, shingle flags and number keys, one piece after the other."""
    empty = (np.empty((0, num_perm), dtype=np.uint32), np.empty(0, dtype=bool), np.empty(0, dtype=np.uint64))
    return tuple(np.concatenate([e, *(getattr(p, name) for p in pieces)])  # type: ignore[return-value]
                 for e, name in zip(empty, ("signatures", "has", "numbers")))


def _json_line(row: dict[str, Any]) -> str:
    # The quarantine's own encoding, so raw rows come back to be written exactly as they would be.
    return json.dumps(row, ensure_ascii=True, default=str) + "\n"


def _settings(cfg: DataConfig, distinct_numbers: bool, max_tokens: Optional[int]) -> dict[str, Any]:
    """What a shard's content depends on besides its rows: the merge checks it was made the same way."""
    return json.loads(json.dumps({"data": result_settings(cfg), "distinct_numbers": distinct_numbers,
                                  "max_tokens": max_tokens}, default=str))


def _work_piece(cfg: DataConfig, spec: dict[str, Any], fmt: Optional[str], *, tokenizer: Any, max_tokens: Optional[int],
                distinct_numbers: bool, num_workers: Optional[int]) -> _Piece:
    """Read, convert (as ``fmt``; None: as the config says, or by this piece's own majority), check, sign."""
    span = tuple(spec["span"]) if "span" in spec else None
    rows = read_rows(spec["source"], spec["kind"], span)
    detected = cfg.format == "auto"
    votes = format_votes(rows) if detected else Counter()
    if fmt is None:
        fmt = majority_format(votes) if detected else cfg.format
    items = list(convert_rows(spec["source"], rows, fmt, detected))
    records = [x for x in items if isinstance(x, Record)]
    cleaned, tokens, problems = check_records(cfg, records, tokenizer=tokenizer, max_tokens=max_tokens)
    for r, messages in zip(records, cleaned):
        r.messages = messages
    ids = [None if p else record_id(r.messages) for r, p in zip(records, problems)]
    signatures, has, numbers = record_signatures(
        [record_text(r.messages) for r, p in zip(records, problems) if p is None], num_perm=cfg.minhash_num_perm,
        shingle_size=cfg.shingle_size, distinct_numbers=distinct_numbers, num_workers=num_workers,
        seed=MINHASH_SEED)
    return _Piece(spec, fmt, [[k, v] for k, v in votes.items()], _count_lines(spec["source"], span) if span else 0,
                  records, [x for x in items if isinstance(x, Rejected)], tokens, problems, ids, signatures, has,
                  numbers)


def _count_lines(path: str, span: tuple[int, int]) -> int:
    lines = 0
    with open(path, "rb") as f:
        f.seek(span[0])
        left = span[1] - span[0]
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            lines += block.count(b"\n")
            left -= len(block)
    return lines


# ----------------------------------------------------------------------------------------------
# Data: merge


def merge_data_shards(cfg: DataConfig, parts: Sequence[PathLike], out_dir: PathLike, seed: int = 0, *,
                      tokenizer: Any = None, max_tokens: Optional[int] = None, distinct_numbers: bool = True,
                      num_workers: Optional[int] = None) -> dict[str, Any]:
    """Deduplicate, split and write the records of every shard, in input order: ``prepare_dataset``'s output.

    Args:
        cfg: The ``data`` section the shards were made with.
        parts: The folders :func:`prepare_data_shard` wrote, in plan order.
        out_dir: Output folder (created if missing).
        seed: Seed of the hash split.
        tokenizer, max_tokens, distinct_numbers, num_workers: As given to the shards (a piece whose
            format guess was wrong is redone here with them).

    Returns:
        The report (also written to ``report.json``), as ``prepare_dataset`` returns it.

    Raises:
        ValueError: The shards were made with other settings, or do not cover the inputs once, in order.
        DataValidationError, EmptyDatasetError: As ``prepare_dataset``.
    """
    settings = _settings(cfg, distinct_numbers, max_tokens)
    pieces = [piece for part in parts for piece in _read_shard(Path(part), settings, cfg.minhash_num_perm)]
    _check_coverage(cfg, pieces)
    for _, group in itertools.groupby(range(len(pieces)), key=lambda k: pieces[k].spec["input"]):
        group = list(group)
        # Each piece took the majority format of its own rows; the input's is that of all its rows.
        # A piece that guessed otherwise is redone here (rare: it takes a file of mixed formats).
        if cfg.format == "auto":
            votes: Counter = Counter()
            for k in group:
                votes.update(dict(pieces[k].votes))
            fmt = majority_format(votes)
            for k in group:
                if pieces[k].format != fmt:
                    pieces[k] = _work_piece(cfg, pieces[k].spec, fmt, tokenizer=tokenizer, max_tokens=max_tokens,
                                            distinct_numbers=distinct_numbers, num_workers=num_workers)
        offset = 0  # a JSONL piece numbered its lines from 1; they follow on from the pieces before it
        for k in group:
            for r in [*pieces[k].records, *pieces[k].rejected]:
                r.line += offset
            offset += pieces[k].lines

    records = [r for p in pieces for r in p.records]
    checked = CheckedRecords(records, [p.spec["test"] for p in pieces for _ in p.records],
                             [r for p in pieces for r in p.rejected], [r.messages for r in records],
                             [n for p in pieces for n in p.tokens], [x for p in pieces for x in p.problems])
    ids = [rid for p in pieces for rid in p.ids if rid is not None]
    signatures, has, numbers = _stacked(pieces, cfg.minhash_num_perm)
    # The same decisions as prepare_dataset's dedupe_texts: shared lines and short answers need the texts.
    msgs = [checked.cleaned[i] for i in checked.fit]
    dd = dedupe_signatures(ids, signatures, has, numbers, threshold=cfg.near_dup_threshold, seed=MINHASH_SEED,
                           texts=[record_text(m) for m in msgs], shared_line_records=cfg.near_dup_shared_line_records,
                           distinct_keys=answer_keys(cfg, msgs), shingle_size=cfg.shingle_size,
                           distinct_numbers=distinct_numbers, num_workers=num_workers)
    return write_dataset(cfg, out_dir, seed, checked, ids, dd)


def _read_shard(folder: Path, settings: dict[str, Any], num_perm: int) -> list[_Piece]:
    if not (folder / SHARD_FILE).exists():
        raise ValueError(f"{folder}: not a finished data shard (no {SHARD_FILE}); run prepare_data_shard again")
    meta = json.loads((folder / SHARD_FILE).read_text())
    if meta["settings"] != settings:
        changed = sorted(k for k in {**settings["data"], **meta["settings"]["data"]}
                         if settings["data"].get(k) != meta["settings"]["data"].get(k))
        raise ValueError(f"{folder}: this shard was made with other data settings ({', '.join(changed) or 'options'} "
                         "differ); run the shards again with this config")
    arrays = np.load(folder / SIGNATURES_FILE)
    signatures = arrays["signatures"].reshape(-1, num_perm)
    pieces, at = [], 0
    with open(folder / ROWS_FILE, encoding="ascii") as f:
        for m in meta["pieces"]:
            source = m["spec"]["source"]
            rows = [json.loads(next(f)) for _ in range(m["records"])]
            rejected = [Rejected(source, row["line"], row["reason"], row["detail"], row["raw"])
                        for row in (json.loads(next(f)) for _ in range(m["rejected"]))]
            problems = [tuple(row["problem"]) if row["problem"] else None for row in rows]
            fit = sum(p is None for p in problems)
            pieces.append(_Piece(
                m["spec"], m["format"], m["votes"], m["lines"],
                [Record(source, row["line"], row["format"], row["messages"], row["raw"]) for row in rows], rejected,
                [row["tokens"] for row in rows], problems, [row["id"] for row in rows], signatures[at: at + fit],
                arrays["has"][at: at + fit], arrays["numbers"][at: at + fit]))
            at += fit
    return pieces


def _check_coverage(cfg: DataConfig, pieces: list[_Piece]) -> None:
    """Every input once, in order, each JSONL file's spans end to end from byte 0: else the output would differ."""
    n_inputs = sum(len(input_files(spec)) for spec in [*cfg.test_files, *cfg.train_files])
    at = [(p.spec["input"], *(p.spec.get("span") or (0, 0))) for p in pieces]
    inputs = [n for n, _ in itertools.groupby(n for n, _, _ in at)]
    joined = all(b[1] == (a[2] if a[0] == b[0] else 0) for a, b in zip([(-1, 0, 0), *at], at))
    if inputs != list(range(n_inputs)) or not joined:
        raise ValueError(f"the shards hold pieces {at} (input, start byte, stop byte) of the {n_inputs} inputs; "
                         "pass every shard of one plan, in plan order")


# ----------------------------------------------------------------------------------------------
# Tokenize


def plan_tokenize_shards(data_dir: PathLike, num_shards: int) -> list[str]:
    """Cut the prepared splits' rows into at most ``num_shards`` shards of about equal rows, in split order.

    Returns:
        One JSON string per shard: its pieces ``{"split", "start", "stop"}`` (rows of that split).
    """
    import pyarrow.parquet as pq

    sizes = [(split, pq.ParquetFile(path).metadata.num_rows) for split in SPLITS
             if (path := Path(data_dir) / f"{split}.parquet").exists()]
    total = sum(n for _, n in sizes)
    cuts = sorted({k * total // num_shards for k in range(1, num_shards)} - {0, total})
    shards: list[list[dict[str, Any]]] = [[] for _ in range(len(cuts) + 1)]
    begin = 0
    for split, n in sizes:
        edges = [begin, *(c for c in cuts if begin < c < begin + n), begin + n]
        for a, b in zip(edges, edges[1:]):
            if b > a:
                shards[bisect.bisect_right(cuts, a)].append({"split": split, "start": a - begin, "stop": b - begin})
        begin += n
    return [json.dumps(s) for s in shards if s] or [json.dumps([])]


def tokenize_shard(cfg: TokenizeConfig, shard: str, data_dir: PathLike, tokenizer_dir: PathLike, out_dir: PathLike) -> Path:
    """Encode one shard of :func:`plan_tokenize_shards` (``input_ids``, ``labels``; no length policy yet).

    Args:
        cfg: ``TokenizeConfig``.
        shard: One shard of the plan.
        data_dir: The data stage's output folder.
        tokenizer_dir: The base model's folder.
        out_dir: Receives the encoded rows (created if missing).

    Returns:
        ``out_dir``, for :func:`merge_tokenize_shards`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = json.loads(shard)
    encoded: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:  # encode with the saved tokenizer, as tokenize_dataset does
        job, _ = save_tokenizer(cfg, tokenizer_dir, Path(tmp))
        for p in pieces:
            table = pq.read_table(Path(data_dir) / f"{p['split']}.parquet")
            encoded += encode_parallel(job, table.slice(p["start"], p["stop"] - p["start"]).to_pylist(), cfg.num_proc)
    ids = pa.list_(pa.int64())
    pq.write_table(pa.Table.from_pylist(encoded, schema=pa.schema([("input_ids", ids), ("labels", ids)])),
                   out / ENCODED_FILE)
    (out / SHARD_FILE).write_text(json.dumps({"pieces": pieces}))
    return out


def merge_tokenize_shards(cfg: TokenizeConfig, parts: Sequence[PathLike], data_dir: PathLike, tokenizer_dir: PathLike,
                          out_dir: PathLike) -> dict:
    """Length policy, packing and saving of every split from the shards' rows: ``tokenize_dataset``'s output.

    Args:
        cfg: ``TokenizeConfig`` the shards were made with.
        parts: The folders :func:`tokenize_shard` wrote, in plan order.
        data_dir: The data stage's output folder the plan was made from.
        tokenizer_dir: The base model's folder.
        out_dir: As for ``tokenize_dataset``.

    Returns:
        The report, as ``tokenize_dataset`` returns it.

    Raises:
        ValueError: The shards do not cover every split's rows once, in order.
    """
    import pyarrow.parquet as pq

    out = Path(out_dir)
    _, report = save_tokenizer(cfg, tokenizer_dir, out)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for part in map(Path, parts):
        encoded = pq.read_table(part / ENCODED_FILE).to_pylist()
        at = 0
        for p in json.loads((part / SHARD_FILE).read_text())["pieces"]:
            if p["start"] != len(rows[p["split"]]):
                raise ValueError(f"{part}: rows {p['start']}-{p['stop']} of {p['split']} come after row "
                                 f"{len(rows[p['split']])}; pass every shard of one plan, in order")
            rows[p["split"]] += encoded[at: at + p["stop"] - p["start"]]
            at += p["stop"] - p["start"]
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.parquet"
        if not path.exists():
            continue
        n = pq.ParquetFile(path).metadata.num_rows
        if len(rows[split]) != n:
            raise ValueError(f"the shards hold {len(rows[split])} of the {n} {split} rows in {path}; "
                             "pass every shard of one plan")
        report["splits"][split] = save_split(cfg, split, n, rows[split], out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
