"""Spider as alpaca records and SQLite databases, and the data stage on it (real data)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from qloraflow.spider import (DEFAULT_HELDOUT_DBS, TASK_LINE, build_databases, create_table_sql, split_by_database,
                              spider_records, write_dataset)


@pytest.fixture(scope="module")
def spider_dir():
    from qloraflow.assets import fetch

    try:
        return fetch("spider")
    except Exception as e:  # no network and no cached copy: nothing real to test on
        pytest.skip(f"the Spider asset could not be fetched ({e}); run `python -m qloraflow.assets spider`")


SCHEMA = {"db_id": "shop", "table_names_original": ["Order", "item line"],
          "column_names_original": [[-1, "*"], [0, "id"], [0, "Home Town"], [1, "order_id"], [1, "qty"]],
          "column_types": ["text", "number", "text", "number", "number"],
          "primary_keys": [1], "foreign_keys": [[3, 1]]}


def test_create_table_sql_quotes_only_what_sqlite_needs():
    sql = create_table_sql(SCHEMA)
    assert sql == ('CREATE TABLE "Order" (\n  id NUMBER,\n  "Home Town" TEXT,\n  PRIMARY KEY (id)\n);\n'
                   'CREATE TABLE "item line" (\n  order_id NUMBER,\n  qty NUMBER,\n'
                   '  FOREIGN KEY (order_id) REFERENCES "Order" (id)\n);')
    con = sqlite3.connect(":memory:")
    con.executescript(sql)
    assert con.execute('SELECT qty FROM "item line" JOIN "Order" ON order_id = id').fetchall() == []


def test_records_carry_schema_question_sql_and_db_id(spider_dir):
    records = spider_records(spider_dir)
    assert len(records) == 1034
    first = records[0]
    assert first["input"] == "How many singers do we have?"
    assert first["output"] == "SELECT count(*) FROM singer"
    assert first["db_id"] == "concert_singer"
    assert first["instruction"].startswith(TASK_LINE + "\nCREATE TABLE stadium (")
    assert "CREATE TABLE singer (" in first["instruction"]
    bare = spider_records(spider_dir, with_schema=False)
    assert [r["instruction"] for r in bare] == [TASK_LINE] * 1034
    assert [r["input"] for r in bare] == [r["input"] for r in records]


def test_split_holds_out_whole_databases(spider_dir):
    records = spider_records(spider_dir)
    train, test = split_by_database(records)
    assert {r["db_id"] for r in test} == set(DEFAULT_HELDOUT_DBS)
    assert not {r["db_id"] for r in train} & set(DEFAULT_HELDOUT_DBS)
    assert (len(train), len(test)) == (843, 191)
    with pytest.raises(ValueError, match="concert_singr"):
        split_by_database(records, ["concert_singr"])


def test_every_gold_query_runs_against_its_database(spider_dir, tmp_path):
    records = spider_records(spider_dir)
    paths = build_databases(spider_dir / "tables.json", tmp_path, sorted({r["db_id"] for r in records}))
    connections = {db: sqlite3.connect(p) for db, p in paths.items()}
    failures = []
    for r in records:
        try:
            connections[r["db_id"]].execute(r["output"]).fetchall()
        except sqlite3.Error as e:
            failures.append((r["db_id"], r["output"], str(e)))
    assert failures == []
    assert len(records) == 1034


def test_write_dataset_writes_splits_and_databases(spider_dir, tmp_path):
    counts = write_dataset(spider_dir, tmp_path)
    assert {k: v for k, v in counts.items() if k != "databases"} == {
        "train": 843, "test": 191, "train_databases": 14, "test_databases": 6}
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (843, 191)
    assert set(train[0]) == {"instruction", "input", "output", "db_id"}
    assert sorted(p.name for p in (tmp_path / "databases").iterdir()) == sorted(
        f"{db}.sqlite" for db in {r["db_id"] for r in train + test})
    con = sqlite3.connect(counts["databases"][test[0]["db_id"]])
    con.execute(test[0]["output"]).fetchall()


# ----------------------------------------------------------------------------------------------
# The data stage on Spider (issue 17): the schema every record of a database carries must not make
# two questions copies, and a correct query is never "repetitive".


@pytest.fixture(scope="module")
def audits(spider_dir, tmp_path_factory):
    """``audit_data_stage`` with the schema in the instruction and without: what the benchmark prints."""
    from qloraflow.spider import audit_data_stage

    root = tmp_path_factory.mktemp("spider-audit")
    return {with_schema: (audit_data_stage(spider_dir, root / str(with_schema), with_schema=with_schema),
                          root / str(with_schema))
            for with_schema in (True, False)}


def test_the_schema_does_not_decide_near_duplicates(audits):
    (with_schema, _), (without, _) = audits[True], audits[False]
    assert abs(with_schema["near_duplicates"] - without["near_duplicates"]) <= 2
    assert with_schema["near_duplicates_other_sql"] == without["near_duplicates_other_sql"] == 0
    # The schema alone would have merged hundreds of records: counted, not removed.
    assert with_schema["shared_text_merges"] > 200 and with_schema["shared_lines"] > 100
    assert with_schema["kept"] + with_schema["near_duplicates"] + with_schema["exact_duplicates"] == 1034


def test_package_option_is_not_a_copy_of_content(audits, spider_dir):
    # The example: removed as a copy (Jaccard 0.83) although its SQL selects another column.
    pair = {'What is the Package Option of TV Channel with serial name "Sky Radio"?',
            'What is the content of TV Channel with serial name "Sky Radio"?'}
    assert pair <= {r["input"] for r in spider_records(spider_dir)}
    _, out = audits[True]
    quarantine = [json.loads(line) for line in (out / "stage" / "quarantine.jsonl").read_text().splitlines()]
    assert not pair & {json.loads(q["raw"])["input"] for q in quarantine}


def test_no_gold_query_is_rejected_as_repetitive(audits):
    for audit, _ in audits.values():
        assert audit["repetitive"] == audit["repetitive_gold_sql"] == 0


def test_without_the_shared_text_rules_the_schema_decides(spider_dir, tmp_path):
    """The same stage with the new settings off: the issue's failure (the test above would fail)."""
    from qloraflow.config import DataConfig
    from qloraflow.spider import audit_data_stage

    off = DataConfig(near_dup_shared_line_records=0, near_dup_short_answer_words=0)
    audit = audit_data_stage(spider_dir, tmp_path, data=off)
    assert audit["near_duplicates"] > 100 and audit["near_duplicates_other_sql"] > 50
