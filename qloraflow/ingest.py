"""Read records from JSONL, JSON, Parquet, CSV, ``datasets`` folders or the Hub into one chat form.

Every supported format becomes ``messages: [{"role": "system"|"user"|"assistant", "content": str}]``
plus a ``format`` name; the row's other fields (a ``db_id``, a category) are the record's ``meta``,
which travels with it to the splits and the evaluation samples but is not part of its content (its
id, deduplication). A row that cannot become a record is not an error of the stage: it comes back
as a :class:`Rejected` with its file, line (1-based; the row number for Parquet, CSV and
``datasets``), a reason code and a message, so the caller can quarantine it::

    from qloraflow.ingest import read_source
    for item in read_source("data/train.jsonl", fmt="auto"):
        print(item.source, item.line, getattr(item, "messages", None) or item.reason, getattr(item, "meta", ""))

Formats (``data.format`` or detected per file by majority over its rows):

- ``alpaca``: ``instruction``, ``output``, optional ``input`` and ``system``.
- ``sharegpt``: ``conversations: [{"from": "human"|"gpt"|"system", "value": ...}]`` (Axolotl's roles;
  ``user``/``assistant`` are accepted too).
- ``messages``: OpenAI style ``messages: [{"role": ..., "content": ...}]``; ``content`` may be a list
  of ``{"type": "text", "text": ...}`` parts; ``developer`` counts as ``system``.
- ``completion``: ``text``, trained on as a whole: ``[{"role": "assistant", "content": text}]``.

Inputs (read by :mod:`qloraflow.readers`, whose :func:`input_files` and :func:`read_rows` this module
offers too): a file (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, ``.csv``), a ``save_to_disk``
folder (a DatasetDict folder gives its ``train`` split), a folder of such files (each read on its own,
in name order), or ``hf:owner/name[:split]`` for the Hub where a network exists.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

# input_files and read_rows are part of this module's API: ingestion is reading plus converting.
from qloraflow.readers import Row, RowRejected, Unparsed, input_files, parse_json, read_rows  # noqa: F401

FORMATS = ("alpaca", "sharegpt", "messages", "completion")

# Axolotl's ShareGPT roles, plus the OpenAI names that ShareGPT exports often carry.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# The fields each format turns into messages; every other field of a row is the record's metadata.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output", "system"), "sharegpt": ("conversations",),
                 "messages": ("messages",), "completion": ("text",)}
META = "meta"  # the splits' column of metadata (a JSON object); read back, its fields are metadata again


@dataclass
class Record:
    """One input row in the internal chat form.

    ``meta`` holds the row's other fields (a Spider record's ``db_id``): they travel with the record
    to the splits and the evaluation samples, but are not part of its content (its id, dedupe).
    """

    source: str
    line: int
    format: str
    messages: list[dict[str, str]]
    raw: Any

    @property
    def meta(self) -> dict[str, Any]:
        """The fields of the row that its format does not read (see :func:`record_meta`)."""
        return record_meta(self.raw, self.format)


@dataclass
class Rejected:
    """One input row that did not make it, and why."""

    source: str
    line: int
    reason: str
    detail: str
    raw: Any


def record_meta(raw: Any, fmt: str) -> dict[str, Any]:
    """The fields of a row that are not its content: everything the format does not read.

    Null fields are left out (a Parquet or ``datasets`` row holds null wherever that row has no such
    field). A ``meta`` field holding a JSON object (the column the data stage writes) gives its own
    fields, so a written split read back keeps its records' metadata. Example::

        record_meta('{"instruction": "q", "output": "SELECT 1", "db_id": "pets_1"}', "alpaca")
        # {'db_id': 'pets_1'}

    Args:
        raw: The row as read (:attr:`Record.raw`): a dict, or the JSON text of a JSON/JSONL row.
        fmt: The format the row was read as (one of :data:`FORMATS`).
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            return {}
    if not isinstance(raw, dict):
        return {}
    own = FORMAT_FIELDS.get(fmt, ())
    meta = {k: v for k, v in raw.items() if k not in own and k != META and v is not None}
    nested = raw.get(META)
    if isinstance(nested, str) and nested.lstrip().startswith("{"):
        nested, _ = parse_json(nested)
    if isinstance(nested, dict):
        meta = {**nested, **meta}
    elif nested is not None:
        meta[META] = nested  # someone else's 'meta' field: kept as it is
    return meta


def meta_json(meta: dict[str, Any]) -> str:
    """A record's metadata as the splits store it: one JSON object, keys sorted (``{}`` when none)."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)


def record_text(messages: list[dict[str, str]]) -> str:
    """The text of a record that is measured, tokenized and deduplicated: its turns, one per line."""
    return "\n".join(m["content"] for m in messages)


def detect_format(row: Any) -> Optional[str]:
    """The format a single row looks like, or None. Chat keys win over flat ones."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "completion"
    return None


def _string(row: dict, key: str, what: str, optional: bool = False) -> Optional[str]:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise RowRejected("missing_field", f"'{key}' is missing; every {what}")
    value = row[key]
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"'{key}' must be a string, got {type(value).__name__} {_short(value)}")
    return value


def _alpaca(row: dict) -> list[dict[str, str]]:
    need = "alpaca record needs 'instruction' and 'output' strings"
    instruction = _string(row, "instruction", need)
    output = _string(row, "output", need)
    extra = _string(row, "input", need, optional=True)
    system = _string(row, "system", need, optional=True)
    # The chat form has one user turn: the input follows the instruction as a paragraph.
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    turns = row.get(key)
    if isinstance(turns, Unparsed):
        raise turns.reject
    if turns is None:
        raise RowRejected("missing_field", f"'{key}' is missing; a {key} record needs a list of turns")
    if not isinstance(turns, list):
        raise RowRejected("wrong_type", f"'{key}' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RowRejected("wrong_type", f"{key}[{n}] must be an object with '{role_key}' and '{text_key}', "
                                        f"got {type(turn).__name__}")
        if role_key not in turn or text_key not in turn:
            missing = role_key if role_key not in turn else text_key
            raise RowRejected("missing_field",
                              f"{key}[{n}] has no '{missing}'; each turn needs '{role_key}' and '{text_key}'")
        role = turn[role_key]
        if not isinstance(role, str) or role.lower() not in roles:
            raise RowRejected("unknown_role", f"{key}[{n}].{role_key} is {_short(role)}; "
                                          f"known roles: {', '.join(sorted(roles))}")
        messages.append({"role": roles[role.lower()], "content": _content(turn[text_key], f"{key}[{n}].{text_key}")})
    # An empty system turn says nothing; keeping it would only make templates render "".
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("invalid_conversation", f"'{key}' has no assistant turn; there is nothing to train on")
    if any(m["role"] == "system" for m in messages[1:]):
        raise RowRejected("invalid_conversation", f"'{key}' has a system turn after the first turn; "
                                              "chat templates accept one, first")
    return messages


def _content(value: Any, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RowRejected("wrong_type", f"{where} must be a string (or a list of text parts), "
                                f"got {type(value).__name__} {_short(value)}")


def to_messages(row: Any, fmt: str) -> list[dict[str, str]]:
    """Convert one row of a known format to the internal chat form.

    Args:
        row: The parsed row (a dict for a well-formed row).
        fmt: One of :data:`FORMATS`.

    Returns:
        The messages, in order.

    Raises:
        RowRejected: The row does not fit ``fmt``; ``reason`` is the quarantine code.
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if not isinstance(row, dict):
        raise RowRejected("wrong_type", f"a record must be a JSON object, got {type(row).__name__} {_short(row)}")
    if fmt == "alpaca":
        return _alpaca(row)
    if fmt == "sharegpt":
        return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "messages":
        return _turns(row, "messages", "role", "content", MESSAGE_ROLES)
    if fmt == "completion":
        text = _string(row, "text", "completion record needs a 'text' string")
        return [{"role": "assistant", "content": text}]
    raise ValueError(f"unknown format {fmt!r}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Rows (qloraflow.readers) into records


def read_source(source: str, kind: str, fmt: str = "auto") -> Iterator[Union[Record, Rejected]]:
    """Every row of one input, as a :class:`Record` or a :class:`Rejected`, in file order.

    Args:
        source: A file or folder path, or an ``hf:`` Hub name (see :func:`input_files`).
        kind: ``jsonl``, ``json``, ``parquet``, ``csv``, ``hf_folder`` or ``hub``.
        fmt: One of :data:`FORMATS`, or ``auto`` to take the format most rows of this input have.

    Raises:
        DataValidationError: The input as a whole cannot be read (damaged Parquet, Hub unreachable).
    """
    rows = read_rows(source, kind)
    detected = fmt == "auto"
    yield from convert_rows(source, rows, majority_format(format_votes(rows)) if detected else fmt, detected)


def format_votes(rows: list[Row]) -> Counter:
    """How many readable rows look like each format, in order of first appearance."""
    return Counter(f for f in (detect_format(r.value) for r in rows if r.error is None) if f)


def majority_format(votes: Counter) -> str:
    """The format most rows have (the first seen on a tie); "" when no row has one."""
    return votes.most_common(1)[0][0] if votes else ""


def convert_rows(source: str, rows: list[Row], fmt: str, detected: bool) -> Iterator[Union[Record, Rejected]]:
    """Rows in the chat form, or rejected with a reason (the second half of :func:`read_source`).

    Args:
        source: The input's name, for each record.
        rows: From :func:`qloraflow.readers.read_rows`.
        fmt: One of :data:`FORMATS`, or "" when no row has a known format.
        detected: ``fmt`` was the majority of the input's rows, not set in the config.
    """
    for r in rows:
        if r.error is not None:
            yield Rejected(source, r.line, r.error.reason, r.error.detail, r.raw)
            continue
        try:
            if not fmt:
                raise RowRejected("missing_field", _no_format_detail(r.value))
            yield Record(source, r.line, fmt, to_messages(r.value, fmt), r.raw)
        except RowRejected as e:
            own = detect_format(r.value)
            if detected and own and own != fmt:  # say why a well-formed row of another format failed
                e.detail += (f" (this input was read as {fmt}, the format of most of its rows, and this row looks "
                             f"like {own}: keep one format per file, or set data.format)")
            yield Rejected(source, r.line, e.reason, e.detail, r.raw)


def _no_format_detail(value: Any) -> str:
    keys = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
    return ("no row of this input has a known format: a record needs 'messages' (chat), 'conversations' "
            f"(ShareGPT), 'instruction' and 'output' (alpaca) or 'text' (completion); this one has: {keys}. "
            "Rename the fields, or set data.format")
