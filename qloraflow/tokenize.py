"""Tokenize: render chat records with a template, mask labels, pack, save an Arrow dataset.

Reads the Parquet splits written by ``qloraflow.data.prepare_dataset`` and writes, per split, a
``datasets`` folder whose rows hold ``input_ids``, ``labels`` (-100 where no loss is taken),
``position_ids`` (restarting at 0 for every example, so packed examples never attend to each other)
and ``id``: the record id from ingest (``qloraflow.data.record_id``), so that a row of the test split
(never packed) is traced to its record; a packed row's ``id`` holds its examples' ids, space-separated.

    from qloraflow.tokenize import tokenize_dataset
    report = tokenize_dataset(cfg.tokenize, data_dir="out/data", tokenizer_dir="base-model", out_dir="out/tok")

How labels are built: every message is rendered as its own slice of the template's text
(``render(messages[:i+1])`` minus ``render(messages[:i])``), each slice is tokenized on its own, and
the assistant slices are the only ones with labels. The prompt slice of an assistant turn ends with
the generation prompt, exactly the text that a server renders before it generates, so the tokens the
model learns to produce are the tokens it will be asked to produce. A template that renders earlier
turns differently once later turns are added (Qwen3 drops earlier turns' reasoning) gets one example
per assistant turn instead; ``qloraflow.templates`` says which and why, and the report records it
(``masking``, and ``per_turn_records`` per split).

The stage runs over shards as the data stage does, one shard being the one-process run:
``qloraflow.shard.plan_tokenize_shards`` cuts the splits' rows, each shard is encoded anywhere
(:func:`encode_shard`; in a map task's pod :func:`tokenize_shard`), and :func:`save_splits` applies
the length policy and packs each split in data order (after a map task: :func:`merge_tokenize_shards`)::

    from qloraflow.shard import plan_tokenize_shards
    parts = [tokenize_shard(cfg.tokenize, s, "out/data", "base-model", f"tok-parts/{k}")
             for k, s in enumerate(plan_tokenize_shards("out/data", num_shards=8))]
    report = merge_tokenize_shards(cfg.tokenize, parts, "out/data", "base-model", "out/tok")  # as tokenize_dataset
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from qloraflow.config import TokenizeConfig
from qloraflow.errors import TemplateError
from qloraflow.shard import plan_tokenize_shards
from qloraflow.splits import SPLITS
from qloraflow.templates import Renderings, conversation_examples, describe_masking, render_turns

IGNORE_INDEX = -100
# The label of the first token of each example in a record's row that holds several (one per assistant
# turn): ignored like IGNORE_INDEX, and where save_split cuts the row into its examples. A row goes from
# encoding to save_split as one row per record (the sharded stage keeps that order and count).
EXAMPLE_START = -101
SHARD_FILE = "shard.json"  # a tokenize shard's folder: the plan's pieces it covers, written last
ENCODED_FILE = "encoded.parquet"  # and its encoded rows

# Named templates for base models that have none. Each renders an assistant turn as
# generation-prompt + content + end-of-turn, which is what label masking relies on.
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


def resolve_chat_template(tokenizer: Any, name: Optional[str], tokenizer_dir: str = "<tokenizer>") -> str:
    """The template to train with: a named one from the config, else the tokenizer's own.

    Raises:
        TemplateError: neither exists; the message says which config key to set.
    """
    if name is not None:
        if name not in TEMPLATES:
            raise TemplateError(f"tokenize.chat_template {name!r} is unknown; choose one of {sorted(TEMPLATES)}")
        return TEMPLATES[name]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise TemplateError(
        f"the tokenizer in {tokenizer_dir} has no chat_template and the config names none; "
        f"set 'tokenize.chat_template' to one of {sorted(TEMPLATES)}")


def ensure_pad_token(tokenizer: Any) -> Optional[str]:
    """Give the tokenizer a pad token if it has none; return a note for the report, or None.

    Labels here are built from explicit masks, never by comparing ids with the pad id, so even a pad
    token equal to EOS cannot mask a real EOS. Still, prefer a token that is not EOS.
    """
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.pad_token = tokenizer.eos_token
    return (f"tokenizer had no pad token; using {tokenizer.pad_token!r} for padding only "
            "(labels are masked by position, so EOS stays trained)")


def record_examples(tokenizer: Any, template: str, record: dict, train_on: str = "completions",
                    rendered: Optional[Renderings] = None) -> list[list[tuple[str, bool]]]:
    """Cut one record into training examples of ``(text, trained)`` slices.

    A chat record is one example when the template only appends, else one per assistant turn (see
    :func:`qloraflow.templates.conversation_examples`). The trained slices are each assistant turn's
    text plus the template's end-of-turn marker; the whitespace the template puts after it stays
    untrained. ``format == "completion"`` trains on the raw text with no template. ``rendered``: the
    record's prefixes from :func:`qloraflow.templates.render_turns` (rendered here when None).

    Raises:
        TemplateError: an assistant turn cannot be masked correctly; the message names the record and the fix.
    """
    messages = list(record["messages"])
    if record.get("format", "messages") == "completion":
        text = "".join(m["content"] for m in messages)
        bos = tokenizer.bos_token or ""
        return [[(bos, False), (text, True)] if bos else [(text, True)]]
    where = record.get("source") or f"record {record.get('id') or ''}".strip()
    return conversation_examples(tokenizer, template, messages, where, train_on, rendered)[0]


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, without what that call builds besides the ids.

    A transformers fast tokenizer's call encodes the batch in Rust and then converts every encoding's
    ids, attention mask and offsets into Python lists; only the ids are needed here, and the Rust
    ``encode_batch_fast`` does not track offsets (the ids are the same: offsets do not take part in
    encoding). The first text still goes through the call, which sets the backend as the call
    encodes (no padding, no truncation, how special tokens split). A tokenizer class that encodes
    otherwise (its own ``__call__`` or ``_encode_plus``), or a slow tokenizer, goes through the call.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if len(texts) < 2 or not hasattr(backend, "encode_batch_fast") or not _encodes_as_backend(type(tokenizer)):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    head = tokenizer(texts[:1], add_special_tokens=False)["input_ids"]
    return head + [e.ids for e in backend.encode_batch_fast(texts[1:], add_special_tokens=False)]


def _encodes_as_backend(cls: type) -> bool:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return (issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus)


def encode_records(records: list[dict], tokenizer: Any, template: str, train_on: str) -> list[dict]:
    """Tokenize records into ``input_ids``/``labels``/``id``, one row per record.

    The records' prefixes are rendered in one batch (:func:`qloraflow.templates.render_turns`), and the
    distinct slices of all records tokenized in one call (:func:`token_ids`). A record cut into several examples
    keeps them back to back in its row, each starting with the label :data:`EXAMPLE_START`;
    :func:`save_split` makes them rows of their own.
    """
    chats = [i for i, r in enumerate(records) if r.get("format", "messages") != "completion"]
    rendered: list[Optional[Renderings]] = [None] * len(records)
    for i, turns in zip(chats, render_turns(tokenizer, template, [list(records[i]["messages"]) for i in chats]) or []):
        rendered[i] = turns
    per_record = [record_examples(tokenizer, template, r, train_on, turns) for r, turns in zip(records, rendered)]
    # Each distinct slice once: the template's own slices (the generation prompt, the whitespace after a
    # turn) recur in every record, and a text always encodes to the same ids.
    texts = list(dict.fromkeys(text for examples in per_record for segs in examples for text, _ in segs))
    ids_of = dict(zip(texts, token_ids(tokenizer, texts)))
    eos = tokenizer.eos_token_id
    out = []
    for record, examples in zip(records, per_record):
        row_ids: list[int] = []
        row_labels: list[int] = []
        for segs in examples:
            input_ids: list[int] = []
            labels: list[int] = []
            trained_any = trained_eos = False
            for text, trained in segs:
                seg_ids = ids_of[text]
                input_ids += seg_ids
                if trained:
                    labels += seg_ids
                    trained_any = trained_any or bool(seg_ids)
                    trained_eos = trained_eos or eos in seg_ids
                else:
                    labels += [IGNORE_INDEX] * len(seg_ids)
            if eos is not None and trained_any and not trained_eos:
                # The template ends turns with its own marker, or there is no template: teach EOS at the end.
                input_ids.append(eos)
                labels.append(eos)
            if labels:
                # never predicted (labels shift by one); also keeps packing exact
                labels[0] = IGNORE_INDEX if len(examples) == 1 else EXAMPLE_START
            row_ids += input_ids
            row_labels += labels
        out.append({"input_ids": row_ids, "labels": row_labels, "id": str(record.get("id") or "")})
    return out


def unpack_examples(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Cut the rows of records that hold several examples (see :data:`EXAMPLE_START`) into one row each.

    Returns:
        The rows in data order, and the counts ``per_turn_records`` (rows cut) and ``per_turn_examples``
        (the rows they became).
    """
    out, counts = [], {"per_turn_records": 0, "per_turn_examples": 0}
    for row in rows:
        labels = row["labels"]
        if not labels or labels[0] != EXAMPLE_START:
            out.append(row)
            continue
        starts = [i for i, l in enumerate(labels) if l == EXAMPLE_START] + [len(labels)]
        for a, b in zip(starts, starts[1:]):
            out.append({"input_ids": row["input_ids"][a:b], "labels": [IGNORE_INDEX] + labels[a + 1:b],
                        "id": row.get("id", "")})
        counts["per_turn_records"] += 1
        counts["per_turn_examples"] += len(starts) - 1
    return out, counts


def apply_length_policy(rows: list[dict], sequence_len: int, overlong: str) -> tuple[list[dict], dict[str, int]]:
    """Truncate or drop over-long rows, and drop rows with no trained token. Returns kept rows and counts."""
    kept, counts = [], {"truncated": 0, "dropped_overlong": 0, "dropped_all_masked": 0}
    for row in rows:
        if len(row["input_ids"]) > sequence_len:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            row = {**row, "input_ids": row["input_ids"][:sequence_len], "labels": row["labels"][:sequence_len]}
            counts["truncated"] += 1
        if all(l == IGNORE_INDEX for l in row["labels"]):
            counts["dropped_all_masked"] += 1
            continue
        kept.append(row)
    return kept, counts


def pack_rows(rows: list[dict], sequence_len: int) -> list[dict]:
    """First-fit-decreasing packing into bins of at most ``sequence_len`` tokens.

    Each packed row keeps one ``position_ids`` run per example; the collator passes them to the model
    without an attention mask, and transformers then builds a block-diagonal causal mask (or
    FlashAttention's varlen path), so no example sees another.
    """
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(sequence_len - n)
    packed = []
    for members in bins:
        members.sort()  # keep the data order inside a bin: deterministic and readable
        packed.append({
            "input_ids": [t for i in members for t in rows[i]["input_ids"]],
            "labels": [t for i in members for t in rows[i]["labels"]],
            "position_ids": [p for i in members for p in range(len(rows[i]["input_ids"]))],
            "id": " ".join(rows[i].get("id", "") for i in members),
        })
    return packed


@dataclass
class EncodeJob:
    """What encoding needs besides the records: the saved tokenizer (with its template), how to label."""

    tokenizer_dir: str
    template: str
    train_on: str


def _encode_shard(job: EncodeJob, records: list[dict]) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    ensure_pad_token(tok)
    return encode_records(records, tok, job.template, job.train_on)


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """Hash of the tokenizer files: part of the tokenize cache key."""
    h = hashlib.sha256()
    for p in sorted(Path(tokenizer_dir).glob("*")):
        if p.is_file() and ("token" in p.name or p.name.endswith((".jinja", ".model", ".txt")) or p.name == "vocab.json"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tokenize_dataset(cfg: TokenizeConfig, data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                     out_dir: str | os.PathLike) -> dict:
    """Tokenize every split of a prepared dataset and save it as Arrow.

    The one-process run of the stage: the splits' rows as one shard (:func:`encode_shard`), then the
    length policy, packing and saving (:func:`save_splits`), as :func:`merge_tokenize_shards` does
    for many shards.

    Args:
        cfg: ``TokenizeConfig``.
        data_dir: folder with ``{train,validation,test}.parquet`` from the data stage.
        tokenizer_dir: the base model's folder (its tokenizer is used).
        out_dir: receives ``{split}/`` datasets, ``tokenizer/`` (with the chat template used) and ``report.json``.

    Returns:
        The report: token counts, truncation and drop counts and packing efficiency per split.
    """
    out = Path(out_dir)
    job, report = save_tokenizer(cfg, tokenizer_dir, out)
    shards = [encode_shard(cfg, job, shard, data_dir) for shard in plan_tokenize_shards(data_dir, num_shards=1)]
    return save_splits(cfg, report, shards, data_dir, out)


def save_tokenizer(cfg: TokenizeConfig, tokenizer_dir: str | os.PathLike, out_dir: Path) -> tuple[EncodeJob, dict]:
    """Save the tokenizer with the chat template to train with under ``out_dir/tokenizer``.

    Returns:
        The encoding job that uses it, and the head of the stage report.

    Raises:
        TemplateError: no template (see :func:`resolve_chat_template`), or one whose assistant turns cannot
            be masked (see :func:`qloraflow.templates.describe_masking`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = resolve_chat_template(tokenizer, cfg.chat_template, str(tokenizer_dir))
    pad_note = ensure_pad_token(tokenizer)
    source = (f"tokenize.chat_template {cfg.chat_template!r}" if cfg.chat_template
              else f"the chat template of {tokenizer_dir}")
    masking = describe_masking(tokenizer, template, source)  # refuses before anything is written
    tokenizer.chat_template = template
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")  # serving renders prompts with exactly this template
    notes = ([pad_note] if pad_note else []) + masking.pop("notes", [])
    report = {"chat_template": cfg.chat_template or "tokenizer", "pad_token": tokenizer.pad_token,
              "masking": masking, "notes": notes, "splits": {}}
    return EncodeJob(str(out_dir / "tokenizer"), template, cfg.train_on), report


def save_split(cfg: TokenizeConfig, split: str, n_records: int, rows: list[dict], out_dir: Path) -> dict[str, Any]:
    """Cut multi-example rows, apply the length policy to one split's rows (in data order), pack them, save them.

    Returns:
        The split's part of the report.
    """
    import datasets

    rows, per_turn = unpack_examples(rows)
    rows, counts = apply_length_policy(rows, cfg.sequence_len, cfg.overlong)
    lengths = length_summary([len(r["input_ids"]) for r in rows], cfg.sequence_len)  # before packing
    n_real = sum(len(r["input_ids"]) for r in rows)
    n_trained = sum(sum(1 for l in r["labels"] if l != IGNORE_INDEX) for r in rows)
    if cfg.packing and split != "test":
        rows = pack_rows(rows, cfg.sequence_len)
        slots = len(rows) * cfg.sequence_len
    else:
        for r in rows:
            r["position_ids"] = list(range(len(r["input_ids"])))
        slots = sum(len(r["input_ids"]) for r in rows)  # batches are padded per batch, length-grouped
    for r in rows:
        r["length"] = len(r["input_ids"])
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"input_ids": [], "labels": [], "position_ids": [], "length": [], "id": []})
    _save_atomic(ds, out_dir / split)
    return {"examples": n_records, **per_turn, "rows": len(rows), "tokens": n_real, "trained_tokens": n_trained,
            **counts, "packing_efficiency": round(n_real / slots, 4) if slots else 0.0, **lengths}


def length_summary(lengths: list[int], sequence_len: int, bins: int = 16) -> dict[str, Any]:
    """Example lengths in tokens after the length policy: percentiles and a histogram over [0, sequence_len].

    Returns:
        ``length_p50``, ``length_p95``, ``length_max`` and ``length_histogram`` (``edges``: bins + 1
        bin edges, ``counts``: examples per bin).
    """
    ordered = sorted(lengths)
    width = max(1, -(-sequence_len // bins))  # ceil: the last bin ends at sequence_len or just above
    counts = [0] * bins
    for n in ordered:
        counts[min(n // width, bins - 1)] += 1
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0  # noqa: E731
    return {"length_p50": at(0.5), "length_p95": at(0.95), "length_max": ordered[-1] if ordered else 0,
            "length_histogram": {"edges": [i * width for i in range(bins + 1)], "counts": counts}}


def encode_parallel(job: EncodeJob, records: list[dict], num_proc: int) -> list[dict]:
    """:func:`encode_records` with the job's tokenizer, in ``num_proc`` processes from 2,000 records."""
    if num_proc <= 1 or len(records) < 2000:
        return _encode_shard(job, records)
    from concurrent.futures import ProcessPoolExecutor

    size = (len(records) + num_proc - 1) // num_proc
    shards = [records[i:i + size] for i in range(0, len(records), size)]
    with ProcessPoolExecutor(num_proc) as pool:
        return [row for part in pool.map(_encode_shard, [job] * len(shards), shards) for row in part]


# ----------------------------------------------------------------------------------------------
# Shards: encode anywhere, then the length policy and packing per split, in data order


@dataclass
class EncodedShard:
    """One shard's rows encoded (``input_ids``, ``labels``; no length policy yet), one row per record.

    Attributes:
        pieces: The plan's entries it covers, ``{"split", "start", "stop"}`` (rows of that split).
        rows: The encoded rows of every piece, one after the other.
    """

    pieces: list[dict[str, Any]]
    rows: list[dict]


def encode_shard(cfg: TokenizeConfig, job: EncodeJob, shard: str, data_dir: str | os.PathLike) -> EncodedShard:
    """Encode the records of one shard of ``qloraflow.shard.plan_tokenize_shards`` with the job's tokenizer."""
    import pyarrow.parquet as pq

    pieces, rows = json.loads(shard), []
    for p in pieces:
        table = pq.read_table(Path(data_dir) / f"{p['split']}.parquet")
        rows += encode_parallel(job, table.slice(p["start"], p["stop"] - p["start"]).to_pylist(), cfg.num_proc)
    return EncodedShard(pieces, rows)


def save_splits(cfg: TokenizeConfig, report: dict, shards: Sequence[EncodedShard], data_dir: str | os.PathLike,
                out_dir: Path) -> dict:
    """Every split saved from the rows of the shards of one plan (:func:`save_split`), and the report.

    Args:
        cfg: ``TokenizeConfig`` the shards were encoded with.
        report: The head of the report, from :func:`save_tokenizer`.
        shards: The shards of one plan, in plan order.
        data_dir: The data stage's output folder the plan was made from.
        out_dir: As for :func:`tokenize_dataset`.

    Returns:
        The report (also written to ``report.json``).

    Raises:
        ValueError: The shards do not cover every split's rows once, in order.
    """
    import pyarrow.parquet as pq

    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for k, shard in enumerate(shards):
        at = 0
        for p in shard.pieces:
            if p["start"] != len(rows[p["split"]]):
                raise ValueError(f"shard {k}: rows {p['start']}-{p['stop']} of {p['split']} come after row "
                                 f"{len(rows[p['split']])}; pass every shard of one plan, in order")
            rows[p["split"]] += shard.rows[at: at + p["stop"] - p["start"]]
            at += p["stop"] - p["start"]
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.parquet"
        if not path.exists():
            continue
        n = pq.ParquetFile(path).metadata.num_rows
        if len(rows[split]) != n:
            raise ValueError(f"the shards hold {len(rows[split])} of the {n} {split} rows in {path}; "
                             "pass every shard of one plan")
        report["splits"][split] = save_split(cfg, split, n, rows[split], out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def tokenize_shard(cfg: TokenizeConfig, shard: str, data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                   out_dir: str | os.PathLike) -> Path:
    """:func:`encode_shard` with the tokenizer as :func:`save_tokenizer` saves it, saved in ``out_dir``.

    A map task's step: ``out_dir`` (created if missing) goes to :func:`merge_tokenize_shards`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # encode with the saved tokenizer, as tokenize_dataset does
        job, _ = save_tokenizer(cfg, tokenizer_dir, Path(tmp))
        encoded = encode_shard(cfg, job, shard, data_dir)
    ids = pa.list_(pa.int64())
    # Whatever columns encoding gives; an empty shard has none to infer a schema from.
    table = (pa.Table.from_pylist(encoded.rows) if encoded.rows
             else pa.Table.from_pylist([], schema=pa.schema([("input_ids", ids), ("labels", ids), ("id", pa.string())])))
    pq.write_table(table, out / ENCODED_FILE)
    (out / SHARD_FILE).write_text(json.dumps({"pieces": encoded.pieces}))
    return out


def merge_tokenize_shards(cfg: TokenizeConfig, parts: Sequence[str | os.PathLike], data_dir: str | os.PathLike,
                          tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """The folders :func:`tokenize_shard` wrote (in plan order) saved as :func:`tokenize_dataset` saves its rows.

    Returns:
        The report, as :func:`tokenize_dataset` returns it.

    Raises:
        ValueError: The shards do not cover every split's rows once, in order.
    """
    import pyarrow.parquet as pq

    out = Path(out_dir)
    _, report = save_tokenizer(cfg, tokenizer_dir, out)
    shards = [EncodedShard(json.loads((Path(part) / SHARD_FILE).read_text())["pieces"],
                           pq.read_table(Path(part) / ENCODED_FILE).to_pylist()) for part in parts]
    return save_splits(cfg, report, shards, data_dir, out)


def _save_atomic(ds: Any, final: Path) -> None:
    import shutil

    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
