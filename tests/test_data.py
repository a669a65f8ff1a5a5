"""The whole data stage on messy inputs: exact counts, quarantine contents, splits and outputs."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qloraflow.config import DataConfig
from qloraflow.data import content_hash, prepare_dataset
from qloraflow.splits import assign_split, report_html
from qloraflow.files import write_atomic
from qloraflow.errors import DataValidationError, EmptyDatasetError

_rng = random.Random(3)
VOCAB = sorted({"".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 9)))
                for _ in range(3000)})


def long_text(seed: int, words: int = 150) -> str:
    return " ".join(random.Random(seed).choices(VOCAB, k=words))


def one_word_changed(text: str, at: int = 60) -> str:
    words = text.split()
    words[at] = "zzchanged"
    return " ".join(words)


def jl(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def read_quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def read_split(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


@pytest.fixture
def messy(tmp_path):
    """A train file with one of every problem, and a test file that train copies from."""
    doc, other, template, held_out = long_text(1), long_text(2), long_text(3, 120), long_text(4)
    a1 = {"instruction": "Summarise this report.", "input": doc, "output": "A short summary."}
    x1 = {"instruction": "Summarise this report.", "input": held_out, "output": "Held-out summary."}
    train = [
        b"\xef\xbb\xbf" + jl(a1),                                                           # 1 kept (BOM)
        jl({"instruction": "Ｗｈａｔ ｉｓ ２＋２？", "output": "４"}),                      # 2 kept (NFKC)
        jl({"instruction": "What is 2+2?", "output": "4"}),                                  # 3 exact dup of 2
        b'{"instruction": "broken", "output": ',                                            # 4 invalid_json
        jl({"instruction": "No answer"}),                                                    # 5 missing_field
        jl({"instruction": "Typed", "output": 4}),                                           # 6 wrong_type
        jl({"instruction": "Blank", "output": " \t "}),                                      # 7 empty_output
        jl({**a1, "input": one_word_changed(doc)}),                                          # 8 near dup of 1
        jl({"instruction": "Count", "input": template, "output": "rows above 30: 12"}),      # 9 kept
        jl({"instruction": "Count", "input": template, "output": "rows above 31: 11"}),      # 10 kept (numbers)
        jl(a1),                                                                              # 11 exact dup of 1
        jl({"instruction": "Advertise", "output": "buy now " * 30}),                         # 12 repetitive
        b'{"instruction": "Latin-1", "output": "caf\xe9"}',                                  # 13 bad_encoding
        b"",                                                                                 # 14 blank: not a record
        jl({**x1, "input": one_word_changed(held_out, 30)}),                                 # 15 near dup of test:1
        jl(x1),                                                                              # 16 exact dup of test:1
        jl({"instruction": "Other", "input": other, "output": "Fine."}),                     # 17 kept
    ]
    train_path = tmp_path / "train.jsonl"
    train_path.write_bytes(b"\r\n".join(train) + b"\r\n")  # CRLF everywhere
    test_path = tmp_path / "test.jsonl"
    test_path.write_bytes(jl(x1) + b"\n")
    # Its one test record has train copies on purpose: the contamination limit is off here.
    cfg = DataConfig(train_files=[str(train_path)], test_files=[str(test_path)], validation_fraction=0.0,
                     max_reject_rate=0.75, max_test_contamination=1.0)
    return cfg, str(train_path), str(test_path)


def test_messy_inputs_exact_counts_and_quarantine(messy, tmp_path):
    cfg, train, test = messy
    out = tmp_path / "out"
    report = prepare_dataset(cfg, out, seed=0)

    q = read_quarantine(out)
    assert [(e["source"], e["line"], e["reason"], e["duplicate_of"]) for e in q] == [
        (train, 3, "exact_duplicate", f"{train}:2"),
        (train, 4, "invalid_json", None),
        (train, 5, "missing_field", None),
        (train, 6, "wrong_type", None),
        (train, 7, "empty_output", None),
        (train, 8, "near_duplicate", f"{train}:1"),
        (train, 11, "exact_duplicate", f"{train}:1"),
        (train, 12, "repetitive", None),
        (train, 13, "bad_encoding", None),
        (train, 15, "near_duplicate", f"{test}:1"),
        (train, 16, "exact_duplicate", f"{test}:1"),
    ]
    assert q[1]["raw"] == '{"instruction": "broken", "output": '
    assert "which is kept" in q[5]["detail"] and 0.9 < q[5]["similarity"] <= 1.0

    kept_train = read_split(out, "train")
    assert [r["source"] for r in kept_train] == [f"{train}:{n}" for n in (1, 2, 9, 10, 17)]
    assert kept_train[1]["messages"] == [{"role": "user", "content": "What is 2+2?"},
                                         {"role": "assistant", "content": "4"}]
    assert [r["source"] for r in read_split(out, "test")] == [f"{test}:1"]
    assert read_split(out, "validation") == []

    assert report["read"] == 17 == report["kept"] + report["rejected"]
    assert (report["kept"], report["rejected"]) == (6, 11)
    assert report["splits"] == {"train": 5, "validation": 0, "test": 1}
    assert report["rejected_by_reason"] == {"bad_encoding": 1, "empty_output": 1, "exact_duplicate": 3,
                                            "invalid_json": 1, "missing_field": 1, "near_duplicate": 2,
                                            "repetitive": 1, "wrong_type": 1}
    assert report["dedupe"]["train_copies_of_test_removed"] == 2
    assert report["sources"][train] == {"read": 16, "kept": 5, "rejected": 11, "formats": {"alpaca": 12}}
    assert [x["kept"] for x in report["near_duplicate_examples"]] == [f"{train}:1", f"{test}:1"]
    assert sum(report["length_histogram"]["train"]) == 5
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report, default=str))


def test_outputs_have_the_schema_and_no_temp_files(messy, tmp_path):
    cfg, _, _ = messy
    out = tmp_path / "out"
    prepare_dataset(cfg, out)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    expected = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                          ("messages", pa.list_(message)), ("meta", pa.string())])
    for split in ("train", "validation", "test"):
        assert pq.read_schema(out / f"{split}.parquet").equals(expected)
    assert sorted(p.name for p in out.iterdir()) == ["quarantine.jsonl", "report.json", "test.parquet",
                                                     "train.parquet", "validation.parquet"]
    ids = [r["id"] for r in read_split(out, "train")]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)


def test_an_interrupted_write_leaves_nothing_under_the_final_name(tmp_path):
    def dies_halfway(path: Path) -> None:
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "train.parquet", dies_halfway)
    assert list(tmp_path.iterdir()) == []


def alpaca_rows(start: int, stop: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {i + 1}?", "output": f"{2 * i + 1}"} for i in range(start, stop)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hash_split_is_stable_when_records_are_appended(tmp_path):
    def run(rows: list[dict], name: str) -> dict[str, str]:
        cfg = DataConfig(train_files=[write_jsonl(tmp_path / f"{name}.jsonl", rows)], validation_fraction=0.2,
                         test_fraction=0.1)
        prepare_dataset(cfg, tmp_path / name, seed=5)
        return {r["id"]: s for s in ("train", "validation", "test") for r in read_split(tmp_path / name, s)}

    before = run(alpaca_rows(0, 300), "before")
    after = run(alpaca_rows(0, 300) + alpaca_rows(300, 450), "after")
    assert len(before) == 300 and len(after) == 450  # templated records differing in numbers all stay
    assert {i: after[i] for i in before} == before
    counts = {s: list(after.values()).count(s) for s in ("train", "validation", "test")}
    assert 60 <= counts["validation"] <= 120 and 20 <= counts["test"] <= 70
    assert all(assign_split(i, 5, 0.2, 0.1) == s for i, s in after.items())
    assert any(assign_split(i, 6, 0.2, 0.1) != s for i, s in after.items())  # the seed matters


def test_too_many_rejects_fail_with_counts_and_the_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(0, 1) + [{"instruction": "x"}] * 3)
    cfg = DataConfig(train_files=[path], validation_fraction=0.0)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "train.parquet").write_text("stale output of an earlier run")
    with pytest.raises(DataValidationError) as err:
        prepare_dataset(cfg, out)
    assert not isinstance(err.value, EmptyDatasetError)
    assert "3 of 4 records (75.0%) were rejected (missing_field: 3)" in str(err.value)
    assert "data.max_reject_rate=0.5" in str(err.value)
    assert len(read_quarantine(out)) == 3 and json.loads((out / "report.json").read_text())["rejected"] == 3
    assert not (out / "train.parquet").exists()


def test_nothing_left_is_an_empty_dataset_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": ""}] * 2)
    cfg = DataConfig(train_files=[path], max_reject_rate=1.0)
    with pytest.raises(EmptyDatasetError, match="no training record left: read 2 record"):
        prepare_dataset(cfg, tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EmptyDatasetError, match="read 0 record"):
        prepare_dataset(DataConfig(train_files=[str(tmp_path / "empty.jsonl")]), tmp_path / "out2")


def test_missing_input_names_every_missing_file(tmp_path):
    cfg = DataConfig(train_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    with pytest.raises(DataValidationError, match=r"not found: .*a\.jsonl, .*b\.jsonl"):
        prepare_dataset(cfg, tmp_path / "out")


def test_formats_and_containers_in_one_run(tmp_path):
    import datasets

    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    (tmp_path / "b.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "h"},
                                                                    {"from": "gpt", "value": "g"}]}]))
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "u"},
                                                       {"role": "assistant", "content": "m"}]}]),
                   tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("text\ncompletion text\n")
    datasets.Dataset.from_list([{"text": "from a datasets folder"}]).save_to_disk(str(tmp_path / "e"))
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.parquet", "d.csv", "e")]
    report = prepare_dataset(DataConfig(train_files=files, validation_fraction=0.0), tmp_path / "out")
    rows = read_split(tmp_path / "out", "train")
    assert [(Path(r["source"]).name, r["format"]) for r in rows] == [
        ("a.jsonl:1", "alpaca"), ("b.json:1", "sharegpt"), ("c.parquet:1", "messages"), ("d.csv:1", "completion"),
        ("e:1", "completion")]
    assert rows[1]["messages"] == [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    assert report["formats"] == {"alpaca": 1, "sharegpt": 1, "messages": 1, "completion": 2}


def test_pii_redaction_and_token_limit(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    rows = [{"instruction": "Mail ann@example.com", "output": "Call +1 555 123 4567 now"},
            {"instruction": "Long", "output": "one two three four five six seven eight nine ten"}]
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "p.jsonl", rows)], redact_pii=True, validation_fraction=0.0,
                     max_reject_rate=1.0)
    report = prepare_dataset(cfg, tmp_path / "out", tokenizer=tokenizer, max_tokens=10)  # record 1: 9 tokens
    (kept,) = read_split(tmp_path / "out", "train")
    assert kept["messages"] == [{"role": "user", "content": "Mail [EMAIL]"},
                                {"role": "assistant", "content": "Call [PHONE] now"}]
    (q,) = read_quarantine(tmp_path / "out")
    assert (q["line"], q["reason"]) == (2, "too_long") and "11 tokens" in q["detail"]
    assert sum(report["token_histogram"]["train"]) == 1


def test_report_html_is_self_contained_and_escaped(messy, tmp_path):
    cfg, _, _ = messy
    report = prepare_dataset(cfg, tmp_path / "out")
    report["near_duplicate_examples"][0]["removed_text"] = "<script>alert(1)</script>"
    page = report_html(report)
    assert page.startswith("<!DOCTYPE html>") and "<h1>Data stage report</h1>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "src=" not in page and "href=" not in page
    assert "near_duplicate" in page and ">17<" in page


def test_content_hash(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "x"}\n')
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.arrow").write_bytes(b"\x00\x01")
    (folder / "state.json").write_text("{}")
    h = content_hash([str(a), str(folder)])
    assert h == content_hash([str(a), str(folder)]) and len(h) == 64
    assert h != content_hash([str(folder), str(a)])
    a.write_text('{"text": "y"}\n')
    assert h != content_hash([str(a), str(folder)])
    with pytest.raises(DataValidationError, match="missing.jsonl"):
        content_hash([str(tmp_path / "missing.jsonl")])


def test_contamination_report_lists_exactly_the_planted_test_copies(tmp_path):
    tests = [{"instruction": "Summarise this report.", "input": long_text(100 + k), "output": f"Summary {k}."}
             for k in range(6)]
    train = [{"instruction": "Summarise this report.", "input": long_text(200 + k), "output": f"Other {k}."}
             for k in range(10)]
    planted = [tests[1], {**tests[2], "input": one_word_changed(tests[2]["input"])}, tests[4], tests[4]]
    train_copy = {**train[0], "input": one_word_changed(train[0]["input"])}  # a copy, but of a train record
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "train.jsonl", train + planted + [train_copy])],
                     test_files=[write_jsonl(tmp_path / "test.jsonl", tests)], validation_fraction=0.0)
    report = prepare_dataset(cfg, tmp_path / "out")

    test_ids = {r["source"].rsplit(":", 1)[1]: r["id"] for r in read_split(tmp_path / "out", "test")}
    dirty = report["contamination"]
    assert dirty["test_ids"] == sorted(test_ids[line] for line in ("2", "3", "5"))  # tests[1], [2] and [4]
    assert (dirty["test_records"], dirty["contaminated_test_records"], dirty["share"]) == (6, 3, 0.5)
    assert (dirty["with_exact_copy"], dirty["with_near_copy_only"], dirty["train_copies_removed"]) == (2, 1, 4)
    assert [(x["test"].rsplit(":", 1)[1], x["train"].rsplit(":", 1)[1], x["kind"]) for x in dirty["examples"]] == [
        ("2", "11", "exact"), ("3", "12", "near"), ("5", "13", "exact")]
    assert report["dedupe"]["train_copies_of_test_removed"] == 4
    assert len(read_split(tmp_path / "out", "train")) == 10  # every copy removed from training, as before
    assert "Test contamination" in report_html(report)

    # Half the test set copied is the limit at 0.5; at 0.4 the stage fails, names the key and writes no split.
    with pytest.raises(DataValidationError) as err:
        prepare_dataset(dataclasses.replace(cfg, max_test_contamination=0.4), tmp_path / "strict")
    assert "3 of 6 test records (50.0%)" in str(err.value) and "data.max_test_contamination=0.4" in str(err.value)
    assert not (tmp_path / "strict" / "test.parquet").exists()
    assert json.loads((tmp_path / "strict" / "report.json").read_text())["contamination"]["test_ids"] == dirty["test_ids"]


def test_a_huge_rejected_row_is_quarantined_cut_with_its_length(tmp_path):
    huge = {"instruction": "x" * 6_000_000}  # 6 MB, no output: rejected as missing_field
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(0, 20) + [huge])
    out = tmp_path / "out"
    prepare_dataset(DataConfig(train_files=[path], validation_fraction=0.0, quarantine_max_chars=1000), out)
    (entry,) = [q for q in read_quarantine(out) if q["reason"] == "missing_field"]
    assert entry["raw_truncated"] is True and entry["raw_chars"] == len(json.dumps(huge))
    assert len(entry["raw"]) == 1000 and entry["raw"] == json.dumps(huge)[:1000]
    assert (out / "quarantine.jsonl").stat().st_size < 10_000  # not the 6 MB row
    short = [q for q in read_quarantine(out) if q["reason"] != "missing_field"]
    assert all("raw_truncated" not in q for q in short)  # the control: short rows are kept whole
