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

Inputs: a file (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, ``.csv``), a ``save_to_disk`` folder
(a DatasetDict folder gives its ``train`` split), a folder of such files (each read on its own, in
name order), or ``hf:owner/name[:split]`` for the Hub where a network exists.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from qloraflow.errors import DataValidationError

FORMATS = ("alpaca", "sharegpt", "messages", "completion")
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hf:"
HF_FOLDER_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BOM = b"\xef\xbb\xbf"

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


class RowRejected(Exception):
    """A row that cannot become a record: a quarantine reason code and message, not a stage error."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Row:
    line: int
    value: Any  # the parsed row; None when unreadable
    raw: Any
    error: Optional[RowRejected] = None


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
        nested, _ = _parse_json(nested)
    if isinstance(nested, dict):
        meta = {**nested, **meta}
    elif nested is not None:
        meta[META] = nested  # someone else's 'meta' field: kept as it is
    return meta


def meta_json(meta: dict[str, Any]) -> str:
    """A record's metadata as the splits store it: one JSON object, keys sorted (``{}`` when none)."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)


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
    if isinstance(turns, _Unparsed):
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
# Reading rows from each kind of input


def _decode_line(raw: bytes) -> tuple[Optional[str], Optional[RowRejected]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, RowRejected("bad_encoding", f"byte {e.start + 1} ({raw[e.start:e.start + 1]!r}) is not UTF-8; "
                                             "re-save the file as UTF-8")


def _parse_json(text: str) -> tuple[Any, Optional[RowRejected]]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, RowRejected("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return None, RowRejected("invalid_json", "not valid JSON: nested too deeply")


def _read_jsonl(path: Path, start: int = 0, stop: Optional[int] = None) -> Iterator[_Row]:
    """Rows of the lines that start in bytes ``[start, stop)``; line numbers count from ``start``."""
    # Binary, decoded per line: one bad byte costs one record, not the file.
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line, raw in enumerate(f, 1):
            if stop is not None and pos >= stop:
                break
            pos += len(raw)
            if raw.startswith(BOM):  # files glued together can carry one on any line
                raw = raw[len(BOM):]
            if not raw.strip():
                continue  # blank lines are not records
            raw = raw.rstrip(b"\r\n")
            text, err = _decode_line(raw)
            if err:
                yield _Row(line, None, raw.decode("utf-8", "backslashreplace"), err)
                continue
            value, err = _parse_json(text)
            yield _Row(line, value, text, err)


def _read_json(path: Path) -> Iterator[_Row]:
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield _Row(line, None, data.decode("utf-8", "backslashreplace")[:2000],
                   RowRejected("bad_encoding", f"byte {e.start + 1} is not UTF-8 (line {line}); "
                                               "re-save the file as UTF-8"))
        return
    start = len(text) - len(text.lstrip())
    if not text[start:]:
        return
    if text[start] != "[":
        value, err = _parse_json(text)
        if err and "Extra data" in err.detail:  # JSON Lines under a .json name
            yield from _read_jsonl(path)
            return
        yield _Row(text.count("\n", 0, start) + 1, value, text[:2000] if err else value, err)
        return
    yield from _json_array(text, start)


def _json_array(text: str, start: int) -> Iterator[_Row]:
    """Elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            yield _Row(line, None, text[pos: pos + 2000],
                       RowRejected("invalid_json", f"not valid JSON: {msg}; the rest of the file from here "
                                                   "is unreadable"))
            return
        yield _Row(line, value, text[pos:end])
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[skip(pos + 1):]:
            return
        line += text.count("\n", counted, pos)
        counted = pos
        yield _Row(line, None, text[pos: pos + 2000],
                   RowRejected("invalid_json", "not valid JSON: expected ',' or ']' after an array element; "
                                           "the rest of the file from here is unreadable"))
        return


def _read_parquet(path: Path) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataValidationError(f"{path}: cannot be read as Parquet ({e}); re-export it or convert it "
                                  "to JSONL") from e
    line = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            line += 1
            yield _Row(line, row, row)


def _read_csv(path: Path) -> Iterator[_Row]:
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    # surrogateescape keeps undecodable bytes visible, so the row holding them is the one rejected.
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    line = 0
    try:
        for row in reader:
            line += 1
            raw = {k: v for k, v in row.items() if k is not None}
            if any(_has_surrogates(v) for v in list(row.values()) + list(row.keys()) if isinstance(v, str)):
                yield _Row(line, None, _escape_surrogates(raw),
                           RowRejected("bad_encoding", "the row has bytes that are not UTF-8; "
                                                       "re-save the file as UTF-8"))
            elif None in row or None in row.values():
                detail = (f"the row has {_field_count(row)} fields, the header {len(reader.fieldnames or [])}; "
                          "check quoting")
                yield _Row(line, None, raw, RowRejected("malformed_row", detail))
            else:
                yield _Row(line, _cells(row), raw)
    except csv.Error as e:
        yield _Row(line + 1, None, "", RowRejected("malformed_row", f"CSV cannot be parsed from here on: {e}"))


def _field_count(row: dict) -> int:
    return sum(1 for k, v in row.items() if k is not None and v is not None) + len(row.get(None) or [])


def _cells(row: dict[str, str]) -> dict[str, Any]:
    """CSV cells are strings: turn lists (conversations, messages) stored as JSON back into lists."""
    out: dict[str, Any] = dict(row)
    for key in ("messages", "conversations"):
        cell = out.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            value, err = _parse_json(cell)
            out[key] = _Unparsed(RowRejected("invalid_json", f"column '{key}': {err.detail}")) if err else value
    return out


class _Unparsed:
    """A CSV cell that should have held JSON; converting the row reports it."""

    def __init__(self, reject: RowRejected):
        self.reject = reject


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    return value


def _hf_rows(ds: Any) -> Iterator[_Row]:
    line = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            line += 1
            row = dict(zip(keys, values))
            yield _Row(line, row, row)


def _read_hf_folder(path: Path) -> Iterator[_Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataValidationError(f"{path}: holds splits {', '.join(ds)} and no 'train'; "
                                      f"list the split's folder instead (e.g. {path}/{next(iter(ds))})")
        ds = ds["train"]
    yield from _hf_rows(ds)


def _read_hub(name: str) -> Iterator[_Row]:
    import datasets

    repo, _, split = name[len(HUB_PREFIX):].partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # no network, unknown repo, gated: all mean "not here"
        raise DataValidationError(
            f"{name}: cannot load it from the Hugging Face Hub ({type(e).__name__}: {e}); where there is no "
            "network, save it with datasets' save_to_disk elsewhere and list that folder") from e
    yield from _hf_rows(ds)


def input_files(spec: str) -> list[tuple[str, str]]:
    """``(source name, kind)`` for each file or dataset an input entry stands for.

    Raises:
        DataValidationError: The path does not exist or has an unsupported type.
    """
    if spec.startswith(HUB_PREFIX):
        return [(spec, "hub")]
    path = Path(spec)
    if path.is_dir():
        if any((path / m).exists() for m in HF_FOLDER_MARKERS):
            return [(spec, "hf_folder")]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_KINDS)
        if not files:
            raise DataValidationError(f"{spec}: folder holds no {', '.join(FILE_KINDS)} file and is not a "
                                      "datasets save_to_disk folder")
        return [(str(p), FILE_KINDS[p.suffix.lower()]) for p in files]
    if not path.exists():
        raise DataValidationError(f"{spec}: input file not found; check data.train_files / data.test_files "
                                  f"(relative paths are read from {Path.cwd()})")
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataValidationError(f"{spec}: unsupported file type '{path.suffix}'; use one of "
                                  f"{', '.join(FILE_KINDS)} or a datasets save_to_disk folder")
    return [(spec, kind)]


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv,
            "hf_folder": _read_hf_folder}


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


def read_rows(source: str, kind: str, span: Optional[tuple[int, int]] = None) -> list[_Row]:
    """The rows of one input, parsed but not converted (the first half of :func:`read_source`).

    Args:
        source: As for :func:`read_source`.
        kind: As for :func:`read_source`.
        span: ``(start, stop)`` bytes of a JSONL file: the rows of the lines that start there,
            numbered from 1 at ``start`` (``start`` must be a line start).
    """
    if span is not None:
        if kind != "jsonl":
            raise ValueError(f"{source}: only JSONL files are read by byte range, not {kind}")
        return list(_read_jsonl(Path(source), *span))
    return list(_read_hub(source) if kind == "hub" else _READERS[kind](Path(source)))


def format_votes(rows: list[_Row]) -> Counter:
    """How many readable rows look like each format, in order of first appearance."""
    return Counter(f for f in (detect_format(r.value) for r in rows if r.error is None) if f)


def majority_format(votes: Counter) -> str:
    """The format most rows have (the first seen on a tie); "" when no row has one."""
    return votes.most_common(1)[0][0] if votes else ""


def convert_rows(source: str, rows: list[_Row], fmt: str, detected: bool) -> Iterator[Union[Record, Rejected]]:
    """Rows in the chat form, or rejected with a reason (the second half of :func:`read_source`).

    Args:
        source: The input's name, for each record.
        rows: From :func:`read_rows`.
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
