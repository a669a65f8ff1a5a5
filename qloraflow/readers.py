"""Read the rows of JSONL, JSON, Parquet, CSV, ``datasets`` folders or the Hub, parsed but not converted.

The first half of ingestion (``qloraflow.ingest`` converts the rows into records): each kind of input
gives :class:`Row` s in file order, each with its line (1-based; the row number for Parquet, CSV and
``datasets``), its parsed value and the raw text or dict. A row that cannot be parsed carries a
:class:`RowRejected` (a reason code and a message) instead of failing the input::

    from qloraflow.readers import input_files, read_rows
    for source, kind in input_files("data/"):
        rows = read_rows(source, kind)

Inputs: a file (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, ``.csv``), a ``save_to_disk`` folder
(a DatasetDict folder gives its ``train`` split), a folder of such files (each read on its own, in
name order), or ``hf:owner/name[:split]`` for the Hub where a network exists. A JSONL file can also be
read by byte range (``span``), which is how the data stage's shards cut one file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from qloraflow.clean import has_lone_surrogate
from qloraflow.errors import DataValidationError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hf:"
HF_FOLDER_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BOM = b"\xef\xbb\xbf"



class RowRejected(Exception):
    """A row that cannot become a record: a quarantine reason code and message, not a stage error."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Row:
    """One row of an input as read: parsed, not yet converted into a record."""

    line: int
    value: Any  # the parsed row; None when unreadable
    raw: Any
    error: Optional[RowRejected] = None


def _decode_line(raw: bytes) -> tuple[Optional[str], Optional[RowRejected]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, RowRejected("bad_encoding", f"byte {e.start + 1} ({raw[e.start:e.start + 1]!r}) is not UTF-8; "
                                             "re-save the file as UTF-8")


def parse_json(text: str) -> tuple[Any, Optional[RowRejected]]:
    """``(value, None)``, or ``(None, RowRejected("invalid_json", ...))`` saying where the text breaks."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, RowRejected("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return None, RowRejected("invalid_json", "not valid JSON: nested too deeply")


def _read_jsonl(path: Path, start: int = 0, stop: Optional[int] = None) -> Iterator[Row]:
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
                yield Row(line, None, raw.decode("utf-8", "backslashreplace"), err)
                continue
            value, err = parse_json(text)
            yield Row(line, value, text, err)


def _read_json(path: Path) -> Iterator[Row]:
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield Row(line, None, data.decode("utf-8", "backslashreplace")[:2000],
                   RowRejected("bad_encoding", f"byte {e.start + 1} is not UTF-8 (line {line}); "
                                               "re-save the file as UTF-8"))
        return
    start = len(text) - len(text.lstrip())
    if not text[start:]:
        return
    if text[start] != "[":
        value, err = parse_json(text)
        if err and "Extra data" in err.detail:  # JSON Lines under a .json name
            yield from _read_jsonl(path)
            return
        yield Row(text.count("\n", 0, start) + 1, value, text[:2000] if err else value, err)
        return
    yield from _json_array(text, start)


def _json_array(text: str, start: int) -> Iterator[Row]:
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
            yield Row(line, None, text[pos: pos + 2000],
                       RowRejected("invalid_json", f"not valid JSON: {msg}; the rest of the file from here "
                                                   "is unreadable"))
            return
        yield Row(line, value, text[pos:end])
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[skip(pos + 1):]:
            return
        line += text.count("\n", counted, pos)
        counted = pos
        yield Row(line, None, text[pos: pos + 2000],
                   RowRejected("invalid_json", "not valid JSON: expected ',' or ']' after an array element; "
                                           "the rest of the file from here is unreadable"))
        return


def _read_parquet(path: Path) -> Iterator[Row]:
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
            yield Row(line, row, row)


def _read_csv(path: Path) -> Iterator[Row]:
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
            if any(has_lone_surrogate(v) for v in list(row.values()) + list(row.keys()) if isinstance(v, str)):
                yield Row(line, None, _escape_surrogates(raw),
                           RowRejected("bad_encoding", "the row has bytes that are not UTF-8; "
                                                       "re-save the file as UTF-8"))
            elif None in row or None in row.values():
                detail = (f"the row has {_field_count(row)} fields, the header {len(reader.fieldnames or [])}; "
                          "check quoting")
                yield Row(line, None, raw, RowRejected("malformed_row", detail))
            else:
                yield Row(line, _cells(row), raw)
    except csv.Error as e:
        yield Row(line + 1, None, "", RowRejected("malformed_row", f"CSV cannot be parsed from here on: {e}"))


def _field_count(row: dict) -> int:
    return sum(1 for k, v in row.items() if k is not None and v is not None) + len(row.get(None) or [])


def _cells(row: dict[str, str]) -> dict[str, Any]:
    """CSV cells are strings: turn lists (conversations, messages) stored as JSON back into lists."""
    out: dict[str, Any] = dict(row)
    for key in ("messages", "conversations"):
        cell = out.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            value, err = parse_json(cell)
            out[key] = Unparsed(RowRejected("invalid_json", f"column '{key}': {err.detail}")) if err else value
    return out


class Unparsed:
    """A CSV cell that should have held JSON; converting the row (``qloraflow.ingest``) reports it."""

    def __init__(self, reject: RowRejected):
        self.reject = reject


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    return value


def _hf_rows(ds: Any) -> Iterator[Row]:
    line = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            line += 1
            row = dict(zip(keys, values))
            yield Row(line, row, row)


def _read_hf_folder(path: Path) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataValidationError(f"{path}: holds splits {', '.join(ds)} and no 'train'; "
                                      f"list the split's folder instead (e.g. {path}/{next(iter(ds))})")
        ds = ds["train"]
    yield from _hf_rows(ds)


def _read_hub(name: str) -> Iterator[Row]:
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


def check_inputs_exist(specs: list[str]) -> None:
    """Raise one :class:`DataValidationError` naming every input that does not exist."""
    missing = [s for s in specs if not s.startswith(HUB_PREFIX) and not Path(s).exists()]
    if missing:
        raise DataValidationError(f"input file(s) not found: {', '.join(missing)}; check data.train_files / "
                                  f"data.test_files (relative paths are read from {Path.cwd()})")


def _wide_encoding(head: bytes) -> Optional[str]:
    """UTF-16 or UTF-32 when ``head`` (a file's first bytes) is such text, by its byte order mark or,
    without one, by the NUL that every ASCII character (JSON's and CSV's punctuation) then carries."""
    def zeros(offset: int, every: int) -> float:
        part = head[offset::every]
        return part.count(0) / len(part) if part else 0.0

    for bom, name, every in ((b"\xff\xfe\x00\x00", "UTF-32", 4), (b"\x00\x00\xfe\xff", "UTF-32", 4),
                             (b"\xff\xfe", "UTF-16", 2), (b"\xfe\xff", "UTF-16", 2)):
        if head.startswith(bom):
            head = head[len(bom):]
            break
    else:
        name = None
    if len(head) < 8:
        return None
    if name == "UTF-32":
        return name if min(zeros(1, 4), zeros(2, 4)) > 0.9 else None  # an ASCII character's middle bytes
    for nul, char in ((1, 0), (0, 1)):  # little-endian: the NUL follows; big-endian: it comes first
        if zeros(nul, 2) > 0.9 and zeros(char, 2) < 0.1:
            return "UTF-16"
    return None


def encoding_problem(path: str | Path) -> Optional[str]:
    """What is wrong with a text file's encoding when it is UTF-16 or UTF-32, else None.

    Read as UTF-8 such a file has a NUL every other byte: every line would be quarantined as
    invalid JSON, so the file is refused whole, with the fix.
    """
    with open(path, "rb") as f:
        name = _wide_encoding(f.read(4096))
    if name is None:
        return None
    fixed = Path(path).with_name(f"{Path(path).stem}.utf8{Path(path).suffix}")
    return f"file {path} is {name}; convert it to UTF-8 (iconv -f {name} -t UTF-8 {path} > {fixed})"


def read_rows(source: str, kind: str, span: Optional[tuple[int, int]] = None) -> list[Row]:
    """The rows of one input, parsed but not converted (the first half of ``qloraflow.ingest.read_source``).

    Args:
        source: A file or folder path, or an ``hf:`` Hub name (see :func:`input_files`).
        kind: ``jsonl``, ``json``, ``parquet``, ``csv``, ``hf_folder`` or ``hub``.
        span: ``(start, stop)`` bytes of a JSONL file: the rows of the lines that start there,
            numbered from 1 at ``start`` (``start`` must be a line start).
    """
    if kind in ("jsonl", "json", "csv"):
        problem = encoding_problem(source)
        if problem:  # the whole file is unreadable as UTF-8: one clear error, not a quarantine of every line
            raise DataValidationError(problem)
    if span is not None:
        if kind != "jsonl":
            raise ValueError(f"{source}: only JSONL files are read by byte range, not {kind}")
        return list(_read_jsonl(Path(source), *span))
    return list(_read_hub(source) if kind == "hub" else _READERS[kind](Path(source)))
