"""Reading every container and format into the internal chat form, and rejecting bad rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qloraflow.errors import DataValidationError
from qloraflow.ingest import Record, Rejected, detect_format, input_files, read_source

SAMPLES = {
    "alpaca": (
        [{"instruction": "Add 2 and 3", "input": "", "output": "5"},
         {"instruction": "Translate to English", "input": "chat", "output": "cat", "system": "You translate."}],
        [[{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}],
         [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Translate to English\n\nchat"},
          {"role": "assistant", "content": "cat"}]],
    ),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                            {"from": "gpt", "value": "Hello"}]},
         {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                            {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6"}]}],
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}],
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]],
    ),
    "messages": (
        [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]},
         {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}],
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}],
         [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]],
    ),
    "completion": (
        [{"text": "Once upon a time"}, {"text": "The end."}],
        [[{"role": "assistant", "content": "Once upon a time"}], [{"role": "assistant", "content": "The end."}]],
    ),
}
CONTAINERS = ["jsonl", "json", "parquet", "csv", "hf"]


def write_input(folder: Path, container: str, rows: list[dict], name: str = "data") -> Path:
    """Write rows the way each kind of input is usually made."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    if container in ("parquet", "hf"):  # columnar: every row has every column (null where absent)
        rows = [{k: r.get(k) for k in fields} for r in rows]
    if container == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif container == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows, indent=2))
    elif container == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif container == "csv":
        path = folder / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:  # lists become JSON in a cell, as pandas users write them
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        import datasets

        path = folder / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def read_all(spec: str | Path, fmt: str = "auto") -> list[Record | Rejected]:
    return [item for source, kind in input_files(str(spec)) for item in read_source(source, kind, fmt)]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_every_format_from_every_container(tmp_path, fmt, container):
    rows, expected = SAMPLES[fmt]
    path = write_input(tmp_path, container, rows)
    items = read_all(path)
    assert all(isinstance(i, Record) for i in items), [getattr(i, "detail", "") for i in items]
    assert [i.messages for i in items] == expected
    assert [i.format for i in items] == [fmt, fmt]
    if container in ("parquet", "csv", "hf"):
        assert [i.line for i in items] == [1, 2]  # row numbers
    elif container == "jsonl":
        assert [i.line for i in items] == [1, 2]
    else:  # json.dumps(indent=2): "[" on line 1, each element starts on the line of its "{"
        text = path.read_text().split("\n")
        assert [text[i.line - 1].strip() for i in items] == ["{", "{"]
        assert items[0].line == 2 and items[1].line > items[0].line


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_forced_format_matches_detection(tmp_path, fmt):
    rows, expected = SAMPLES[fmt]
    path = write_input(tmp_path, "jsonl", rows)
    assert [i.messages for i in read_all(path, fmt)] == expected


def test_detect_format_prefers_chat_keys():
    assert detect_format({"messages": [], "text": "x"}) == "messages"
    assert detect_format({"conversations": [], "instruction": "a", "output": "b"}) == "sharegpt"
    assert detect_format({"instruction": "a", "output": "b", "text": "c"}) == "alpaca"
    assert detect_format({"instruction": "a"}) is None
    assert detect_format(["text"]) is None


def test_bad_rows_are_rejected_with_line_and_reason(tmp_path):
    lines = [
        '{"instruction": "ok", "output": "fine"}',
        '{"instruction": "broken", "output": ',  # invalid JSON
        '{"instruction": "no output"}',  # missing field
        '{"instruction": "typed", "output": 42}',  # non-string
        '["a", "list"]',  # not an object
        '',  # blank line: not a record
        '{"instruction": "nul", "output": null}',  # null counts as missing
        '{"instruction": "also ok", "output": "yes", "input": ["x"]}',  # non-string optional
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = read_all(path)
    got = [(i.line, getattr(i, "reason", "ok")) for i in items]
    assert got == [(1, "ok"), (2, "invalid_json"), (3, "missing_field"), (4, "wrong_type"), (5, "wrong_type"),
                   (7, "missing_field"), (8, "wrong_type")]
    by_line = {i.line: i for i in items}
    assert "'output' is missing" in by_line[3].detail
    assert "'output' must be a string, got int 42" in by_line[4].detail
    assert by_line[2].raw == lines[1]


def test_conversation_structure_is_checked(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},  # nothing to learn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": {"nested": 1}}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "developer", "content": "rules"}, {"role": "system", "content": ""},
                      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "ok"}]},
    ]
    path = write_input(tmp_path, "jsonl", rows)
    items = read_all(path)
    assert [getattr(i, "reason", "ok") for i in items] == [
        "invalid_conversation", "invalid_conversation", "unknown_role", "wrong_type", "missing_field", "wrong_type",
        "ok"]
    assert items[-1].messages == [{"role": "system", "content": "rules"}, {"role": "user", "content": "ab"},
                                  {"role": "assistant", "content": "ok"}]


def test_bom_crlf_and_bad_encoding_lines(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n'
                     b'{"text": "caf\xe9 in latin-1"}\r\n'
                     b'{"text": "third \xc3\xa9"}\r\n')
    items = read_all(path)
    assert [(i.line, getattr(i, "reason", "ok")) for i in items] == [(1, "ok"), (2, "bad_encoding"), (3, "ok")]
    assert items[0].messages[0]["content"] == "first"
    assert items[2].messages[0]["content"] == "third \u00e9"
    assert "\\xe9" in items[1].raw and "not UTF-8" in items[1].detail


def test_csv_bad_encoding_and_malformed_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\r\nfine,yes\r\nlatin,caf\xe9\r\ntoo,many,fields\r\n"
                     b"\"q\",\"a, with comma\"\r\n")
    items = read_all(path)
    assert [(i.line, getattr(i, "reason", "ok")) for i in items] == [
        (1, "ok"), (2, "bad_encoding"), (3, "malformed_row"), (4, "ok")]
    assert items[3].messages[1]["content"] == "a, with comma"


def test_csv_cell_with_broken_json(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('messages\n"[{""role"": ""user"""\n')
    (item,) = read_all(path)
    assert item.reason == "invalid_json" and "column 'messages'" in item.detail


def test_json_array_stops_at_first_broken_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"text": "one"},\n {"text": "two"},\n {"text": oops},\n {"text": "four"}\n]\n')
    items = read_all(path)
    assert [(i.line, getattr(i, "reason", "ok")) for i in items] == [(2, "ok"), (3, "ok"), (4, "invalid_json")]


def test_json_lines_under_a_json_name_and_single_object(tmp_path):
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [i.messages[0]["content"] for i in read_all(tmp_path / "lines.json")] == ["a", "b"]
    (tmp_path / "one.json").write_text('\n{"text": "only"}')
    (item,) = read_all(tmp_path / "one.json")
    assert item.line == 2 and item.messages[0]["content"] == "only"


def test_mixed_file_reads_as_majority_format_and_says_so(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"instruction": "i", "output": "o"}]
    items = read_all(write_input(tmp_path, "jsonl", rows))
    assert [getattr(i, "reason", "ok") for i in items] == ["ok", "ok", "missing_field"]
    assert "read as completion" in items[2].detail and "looks like alpaca" in items[2].detail


def test_unknown_format_names_the_fields(tmp_path):
    items = read_all(write_input(tmp_path, "jsonl", [{"question": "q", "answer": "a"}]))
    assert items[0].reason == "missing_field"
    assert "question, answer" in items[0].detail and "data.format" in items[0].detail


def test_dataset_dict_folder_reads_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "t1"}, {"text": "t2"}]),
                               "test": datasets.Dataset.from_list([{"text": "x"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [i.messages[0]["content"] for i in read_all(tmp_path / "dd")] == ["t1", "t2"]
    datasets.DatasetDict({"a": dd["test"]}).save_to_disk(str(tmp_path / "noval"))
    with pytest.raises(DataValidationError, match="no 'train'"):
        read_all(tmp_path / "noval")


def test_folder_of_files_reads_each_in_name_order(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write_input(folder, "jsonl", [{"text": "b1"}], name="b")
    write_input(folder, "csv", [{"instruction": "a", "output": "a1"}], name="a")
    (folder / "notes.txt").write_text("ignored")
    items = read_all(folder)
    assert [(Path(i.source).name, i.format) for i in items] == [("a.csv", "alpaca"), ("b.jsonl", "completion")]


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(DataValidationError, match="nope.jsonl: input file not found"):
        input_files(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataValidationError, match="unsupported file type '.txt'"):
        input_files(str(tmp_path / "x.txt"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match="cannot be read as Parquet"):
        read_all(bad)


def test_hub_name_without_network_is_a_clear_error(tmp_path):
    # A subprocess, so the offline switch is read when datasets is imported.
    code = ("from qloraflow.ingest import read_source\n"
            "from qloraflow.errors import DataValidationError\n"
            "try:\n list(read_source('hf:qloraflow-none/does-not-exist', 'hub'))\n"
            "except DataValidationError as e:\n print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    expected = "ERR hf:qloraflow-none/does-not-exist: cannot load it from the Hugging Face Hub"
    assert out.stdout.startswith(expected), out.stderr


# ----------------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("container", CONTAINERS)
def test_extra_fields_become_the_records_meta(tmp_path, container):
    rows = [{"instruction": "Count the pets", "output": "SELECT count(*) FROM pets", "db_id": "pets_1", "level": 2},
            {"instruction": "Name the singers", "output": "SELECT name FROM singer", "db_id": "singer"}]
    items = read_all(write_input(tmp_path, container, rows))
    assert [i.messages[-1]["content"] for i in items] == ["SELECT count(*) FROM pets", "SELECT name FROM singer"]
    # CSV cells are text; columnar files hold null where a row lacks a field, which is no metadata
    level = "2" if container == "csv" else 2
    second = {"db_id": "singer", "level": ""} if container == "csv" else {"db_id": "singer"}
    assert [i.meta for i in items] == [{"db_id": "pets_1", "level": level}, second]


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_the_formats_own_fields_are_not_meta(tmp_path, fmt):
    rows, _ = SAMPLES[fmt]
    items = read_all(write_input(tmp_path, "jsonl", [{**r, "category": "c"} for r in rows]))
    assert [i.meta for i in items] == [{"category": "c"}] * 2


def test_meta_column_read_back_keeps_its_fields(tmp_path):
    """A split the data stage wrote (its metadata in a ``meta`` JSON column) read again as input."""
    from qloraflow.ingest import meta_json

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"id": "x1", "messages": messages, "meta": meta_json({"db_id": "pets_1", "tags": ["a"]})},
            {"messages": messages, "meta": "not an object"}]
    first, second = read_all(write_input(tmp_path, "parquet", rows))
    assert first.meta == {"id": "x1", "db_id": "pets_1", "tags": ["a"]}
    assert second.meta == {"meta": "not an object"}  # someone else's 'meta' field is kept as it is
    assert meta_json(first.meta) == '{"db_id": "pets_1", "id": "x1", "tags": ["a"]}'  # keys sorted: stable bytes
