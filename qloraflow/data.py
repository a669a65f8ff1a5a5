"""The data stage: plan shards -> work each (read, convert, clean, check, MinHash) -> merge (dedupe, split, write).

The costly work is per record; what needs all records at once (exact and near duplicates, the split,
the quarantine's order, the report) is cheap once the signatures exist. So the stage is three steps,
and the one-process run is the sharded one with one shard, through the same functions::

    from qloraflow.config import load_config
    from qloraflow.data import prepare_dataset
    report = prepare_dataset(load_config("configs/tiny.yaml").data, "outputs/data", seed=42)

is ``merge_data_shards(cfg, [work_data_shard(cfg, s) for s in plan_data_shards(cfg, 1)], "outputs/data",
seed=42)``. With more shards (a Flyte map task, one pod per shard) each shard's work crosses to the
merge as a folder, and the output is the same, byte for byte (a test holds them equal)::

    from qloraflow.shard import plan_data_shards
    plan = plan_data_shards(cfg.data, num_shards=8)
    parts = [prepare_data_shard(cfg.data, s, f"parts/{k}") for k, s in enumerate(plan)]
    report = merge_data_shards(cfg.data, parts, "outputs/data", seed=42)

A shard cannot know two things, so the merge settles them: where the line numbers of a JSONL piece
start (each piece counts its lines; the merge adds them up), and the format of an input read with
``format: auto`` (a piece takes the majority of its own rows; the merge counts the votes of all the
input's pieces and redoes any piece that guessed otherwise). The output folder then holds the splits,
the quarantine and the report that :mod:`qloraflow.splits` writes; every record read is either in a
split or in the quarantine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from qloraflow.clean import check_messages, clean_messages
from qloraflow.config import DataConfig, result_settings
from qloraflow.dedupe import dedupe_signatures, record_signatures
from qloraflow.errors import DataValidationError
from qloraflow.ingest import Record, Rejected, convert_rows, format_votes, majority_format, record_text
from qloraflow.minhash import short_text_keys
from qloraflow.readers import input_files, read_rows
from qloraflow.shard import plan_data_shards
from qloraflow.splits import CheckedRecords, write_dataset

PathLike = Union[str, os.PathLike]
MINHASH_SEED = 1  # datasketch's default permutation seed
SHARD_FILE = "shard.json"  # written last: a shard folder without it is incomplete
ROWS_FILE = "rows.jsonl"
SIGNATURES_FILE = "signatures.npz"


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


def prepare_dataset(cfg: DataConfig, out_dir: PathLike, seed: int = 0, *, tokenizer: Any = None,
                    max_tokens: Optional[int] = None, distinct_numbers: bool = True,
                    num_workers: Optional[int] = None) -> dict[str, Any]:
    """Read, clean, check, deduplicate and split the configured inputs; write them and a report.

    The one-process run: the inputs as one shard (:func:`work_data_shard`), merged on their own
    (:func:`merge_data_shards`). Test inputs are deduplicated first and kept whole (only duplicates
    within them go), so a train record that copies a test record is the one removed.

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
    options = dict(tokenizer=tokenizer, max_tokens=max_tokens, distinct_numbers=distinct_numbers,
                   num_workers=num_workers)
    shards = [work_data_shard(cfg, shard, **options) for shard in plan_data_shards(cfg, num_shards=1)]
    return merge_data_shards(cfg, shards, out_dir, seed, **options)


# ----------------------------------------------------------------------------------------------
# One shard: read, convert, clean, check, MinHash


@dataclass
class Piece:
    """One piece of an input (a plan's entry), read, converted, cleaned, checked and MinHashed."""

    spec: dict[str, Any]  # the plan's entry: input, source, kind, test, span
    format: str  # what its rows were converted as
    votes: list[list[Any]]  # [format, rows] for format: auto, in order of first appearance
    lines: int  # lines of a JSONL span that more of its input follows: where the next piece's line numbers start
    records: list[Record]  # messages: the cleaned ones
    rejected: list[Rejected]
    tokens: list[Optional[int]]
    problems: list[Optional[tuple[str, str]]]
    ids: list[Optional[str]]  # record_id of the records without a problem
    signatures: np.ndarray  # of the records without a problem, in order (record_signatures)
    has: np.ndarray
    numbers: np.ndarray


@dataclass
class DataShard:
    """A shard's per-record work: what :func:`merge_data_shards` decides over.

    Attributes:
        settings: What its content depends on besides the rows (the merge checks it was made the same way).
        pieces: Its pieces, in plan order.
    """

    settings: dict[str, Any]
    pieces: list[Piece]


def work_data_shard(cfg: DataConfig, shard: str, *, tokenizer: Any = None, max_tokens: Optional[int] = None,
                    distinct_numbers: bool = True, num_workers: Optional[int] = None) -> DataShard:
    """The per-record work of the data stage on one shard of ``qloraflow.shard.plan_data_shards``.

    Args:
        cfg: The ``data`` section.
        shard: One shard of the plan.
        tokenizer, max_tokens, distinct_numbers, num_workers: As for :func:`prepare_dataset`.

    Returns:
        The shard's records, rejected rows and signatures, for :func:`merge_data_shards`.

    Raises:
        DataValidationError: An input as a whole cannot be read.
    """
    pieces = [_read_piece(cfg, spec, None, tokenizer=tokenizer, max_tokens=max_tokens) for spec in json.loads(shard)]
    _sign(cfg, pieces, distinct_numbers, num_workers)
    return DataShard(_settings(cfg, distinct_numbers, max_tokens), pieces)


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


def _token_counts(tokenizer: Any, texts: list[str], batch: int = 512) -> list[int]:
    counts: list[int] = []
    for i in range(0, len(texts), batch):
        counts += [len(ids) for ids in tokenizer(texts[i: i + batch], add_special_tokens=False)["input_ids"]]
    return counts


def _read_piece(cfg: DataConfig, spec: dict[str, Any], fmt: Optional[str], *, tokenizer: Any,
                max_tokens: Optional[int]) -> Piece:
    """Read, convert (as ``fmt``; None: as the config says, or by this piece's own majority) and check.

    The signatures come after (:func:`_sign`), for all of a shard's pieces at once.
    """
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
    empty = _signed([], cfg.minhash_num_perm)
    return Piece(spec, fmt, [[k, v] for k, v in votes.items()], _lines_before_next(spec["source"], span),
                 records, [x for x in items if isinstance(x, Rejected)], tokens, problems, ids, *empty)


def _sign(cfg: DataConfig, pieces: list[Piece], distinct_numbers: bool, num_workers: Optional[int]) -> None:
    """MinHash the records without a problem of all ``pieces`` in one go (worker processes pay off on the
    whole shard, not on a piece), and give each piece its rows."""
    texts = [[record_text(r.messages) for r, p in zip(piece.records, piece.problems) if p is None] for piece in pieces]
    arrays = record_signatures([t for piece_texts in texts for t in piece_texts], num_perm=cfg.minhash_num_perm,
                               shingle_size=cfg.shingle_size, distinct_numbers=distinct_numbers,
                               num_workers=num_workers, seed=MINHASH_SEED)
    at = 0
    for piece, piece_texts in zip(pieces, texts):
        piece.signatures, piece.has, piece.numbers = (a[at: at + len(piece_texts)] for a in arrays)
        at += len(piece_texts)


def _signed(pieces: list[Piece], num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces' signatures, shingle flags and number keys, one piece after the other."""
    empty = (np.empty((0, num_perm), dtype=np.uint32), np.empty(0, dtype=bool), np.empty(0, dtype=np.uint64))
    return tuple(np.concatenate([e, *(getattr(p, name) for p in pieces)])  # type: ignore[return-value]
                 for e, name in zip(empty, ("signatures", "has", "numbers")))


def _lines_before_next(path: str, span: Optional[tuple[int, int]]) -> int:
    """Lines of a JSONL span that does not reach the end of its file (0 otherwise: no piece follows it)."""
    if span is None or span[1] >= os.path.getsize(path):
        return 0
    lines = 0
    with open(path, "rb") as f:
        f.seek(span[0])
        left = span[1] - span[0]
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            lines += block.count(b"\n")
            left -= len(block)
    return lines


def _settings(cfg: DataConfig, distinct_numbers: bool, max_tokens: Optional[int]) -> dict[str, Any]:
    """What a shard's content depends on besides its rows: the merge checks it was made the same way."""
    return json.loads(json.dumps({"data": result_settings(cfg), "distinct_numbers": distinct_numbers,
                                  "max_tokens": max_tokens}, default=str))


# ----------------------------------------------------------------------------------------------
# A shard as a folder, between a map task's pods


def prepare_data_shard(cfg: DataConfig, shard: str, out_dir: PathLike, *, tokenizer: Any = None,
                       max_tokens: Optional[int] = None, distinct_numbers: bool = True,
                       num_workers: Optional[int] = None) -> Path:
    """:func:`work_data_shard`, saved in ``out_dir`` (created if missing) for :func:`merge_data_shards`.

    Returns:
        ``out_dir``.
    """
    work = work_data_shard(cfg, shard, tokenizer=tokenizer, max_tokens=max_tokens,
                           distinct_numbers=distinct_numbers, num_workers=num_workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ROWS_FILE, "w", encoding="ascii") as f:
        for p in work.pieces:
            for r, n, problem, rid in zip(p.records, p.tokens, p.problems, p.ids):
                row = {"line": r.line, "format": r.format, "raw": r.raw, "tokens": n, "problem": problem,
                       "messages": None if problem else r.messages, "id": rid}
                f.write(_json_line(row))
            for r in p.rejected:
                f.write(_json_line({"line": r.line, "reason": r.reason, "detail": r.detail, "raw": r.raw}))
    signatures, has, numbers = _signed(work.pieces, cfg.minhash_num_perm)
    np.savez(out / SIGNATURES_FILE, signatures=signatures, has=has, numbers=numbers)
    meta = [{"spec": p.spec, "format": p.format, "votes": p.votes, "lines": p.lines, "records": len(p.records),
             "rejected": len(p.rejected)} for p in work.pieces]
    (out / SHARD_FILE).write_text(json.dumps({"settings": work.settings, "pieces": meta}, indent=1))
    return out


def _json_line(row: dict[str, Any]) -> str:
    # The quarantine's own encoding, so raw rows come back to be written exactly as they would be.
    return json.dumps(row, ensure_ascii=True, default=str) + "\n"


def load_data_shard(folder: PathLike, num_perm: int) -> DataShard:
    """The shard :func:`prepare_data_shard` saved in ``folder``.

    Raises:
        ValueError: The folder holds no finished shard.
    """
    folder = Path(folder)
    if not (folder / SHARD_FILE).exists():
        raise ValueError(f"{folder}: not a finished data shard (no {SHARD_FILE}); run prepare_data_shard again")
    meta = json.loads((folder / SHARD_FILE).read_text())
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
            pieces.append(Piece(
                m["spec"], m["format"], m["votes"], m["lines"],
                [Record(source, row["line"], row["format"], row["messages"], row["raw"]) for row in rows], rejected,
                [row["tokens"] for row in rows], problems, [row["id"] for row in rows], signatures[at: at + fit],
                arrays["has"][at: at + fit], arrays["numbers"][at: at + fit]))
            at += fit
    return DataShard(meta["settings"], pieces)


# ----------------------------------------------------------------------------------------------
# Merge: every decision that needs all records, once, in input order


def merge_data_shards(cfg: DataConfig, parts: Sequence[Union[DataShard, PathLike]], out_dir: PathLike,
                      seed: int = 0, *, tokenizer: Any = None, max_tokens: Optional[int] = None,
                      distinct_numbers: bool = True, num_workers: Optional[int] = None) -> dict[str, Any]:
    """Deduplicate, split and write the records of every shard, in input order.

    Args:
        cfg: The ``data`` section the shards were made with.
        parts: The shards of one plan, in plan order: from :func:`work_data_shard`, or the folders
            :func:`prepare_data_shard` wrote.
        out_dir: Output folder (created if missing).
        seed: Seed of the hash split.
        tokenizer, max_tokens, distinct_numbers, num_workers: As given to the shards (a piece whose
            format guess was wrong is redone here with them).

    Returns:
        The report (also written to ``report.json``), as :func:`prepare_dataset` returns it.

    Raises:
        ValueError: The shards were made with other settings, or do not cover the inputs once, in order.
        DataValidationError, EmptyDatasetError: As :func:`prepare_dataset`.
    """
    settings = _settings(cfg, distinct_numbers, max_tokens)
    shards = [p if isinstance(p, DataShard) else load_data_shard(p, cfg.minhash_num_perm) for p in parts]
    for part, shard in zip(parts, shards):
        _check_settings(part, shard.settings, settings)
    pieces = [piece for shard in shards for piece in shard.pieces]
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
                    pieces[k] = _read_piece(cfg, pieces[k].spec, fmt, tokenizer=tokenizer, max_tokens=max_tokens)
                    _sign(cfg, [pieces[k]], distinct_numbers, num_workers)
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
    signatures, has, numbers = _signed(pieces, cfg.minhash_num_perm)
    # Dedupe across test and train together, in that order; shared lines and short answers need the texts.
    msgs = [checked.cleaned[i] for i in checked.fit]
    dd = dedupe_signatures(ids, signatures, has, numbers, threshold=cfg.near_dup_threshold, seed=MINHASH_SEED,
                           texts=[record_text(m) for m in msgs], shared_line_records=cfg.near_dup_shared_line_records,
                           distinct_keys=answer_keys(cfg, msgs), shingle_size=cfg.shingle_size,
                           distinct_numbers=distinct_numbers, num_workers=num_workers)
    return write_dataset(cfg, out_dir, seed, checked, ids, dd)


def answer_keys(cfg: DataConfig, messages: list[list[dict[str, str]]]) -> Optional[list[int]]:
    """Per record, the key of its answer when shorter than ``data.near_dup_short_answer_words``
    (see :func:`qloraflow.minhash.short_text_keys`): records with different short answers are never
    near duplicates. None when the setting is off."""
    if cfg.near_dup_short_answer_words <= 0:
        return None
    answers = ["\n".join(m["content"] for m in msgs if m["role"] == "assistant") for msgs in messages]
    return short_text_keys(answers, cfg.near_dup_short_answer_words)


def _check_settings(part: Union[DataShard, PathLike], made: dict[str, Any], settings: dict[str, Any]) -> None:
    if made != settings:
        changed = sorted(k for k in {**settings["data"], **made["data"]}
                         if settings["data"].get(k) != made["data"].get(k))
        where = "a shard" if isinstance(part, DataShard) else str(part)
        raise ValueError(f"{where}: this shard was made with other data settings ({', '.join(changed) or 'options'} "
                         "differ); run the shards again with this config")


def _check_coverage(cfg: DataConfig, pieces: list[Piece]) -> None:
    """Every input once, in order, each JSONL file's spans end to end from byte 0: else the output would differ."""
    n_inputs = sum(len(input_files(spec)) for spec in [*cfg.test_files, *cfg.train_files])
    at = [(p.spec["input"], *(p.spec.get("span") or (0, 0))) for p in pieces]
    inputs = [n for n, _ in itertools.groupby(n for n, _, _ in at)]
    joined = all(b[1] == (a[2] if a[0] == b[0] else 0) for a, b in zip([(-1, 0, 0), *at], at))
    if inputs != list(range(n_inputs)) or not joined:
        raise ValueError(f"the shards hold pieces {at} (input, start byte, stop byte) of the {n_inputs} inputs; "
                         "pass every shard of one plan, in plan order")
