"""Task metrics: exact match, SQL execution accuracy against a real SQLite database, SQL that runs, SQL text
match, ROUGE-L, chrF."""

import sqlite3

import pytest

from qloraflow.errors import DataValidationError
from qloraflow.evaluate import (chrf, execution_match, exact_match, normalize_sql, record_databases, rouge_l, score,
                                sql_exact_match, sql_runs)


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "shop.sqlite"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE customers (id INTEGER, name TEXT, city TEXT, age INTEGER)")
        c.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)",
                      [(1, "Ana", "Paris", 30), (2, "Ben", "Lyon", 41), (3, "Carla", "Paris", 52)])
    return str(path)


def test_exact_match_folds_whitespace_and_final_semicolon():
    assert exact_match("SELECT  name FROM customers;", "SELECT name FROM customers") == 1.0
    assert exact_match("SELECT name FROM customers WHERE city = 'paris'",
                       "SELECT name FROM customers WHERE city = 'Paris'") == 0.0


def test_execution_accuracy_compares_result_rows(db):
    ref = "SELECT COUNT(*) FROM customers WHERE city = 'Paris';"
    assert execution_match("SELECT COUNT(id) FROM customers WHERE city='Paris'", ref, db) == 1.0  # other text, same rows
    assert execution_match("SELECT COUNT(*) FROM customers", ref, db) == 0.0
    assert execution_match("SELEC nonsense", ref, db) == 0.0  # invalid SQL scores 0, never raises
    assert execution_match("DELETE FROM customers", ref, db) == 0.0  # read-only connection
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM customers").fetchone()[0] == 3
    order = "SELECT name FROM customers ORDER BY age DESC"
    assert execution_match("SELECT name FROM customers ORDER BY age", order, db) == 0.0  # order matters there
    assert execution_match("SELECT name FROM customers WHERE age > 0", "SELECT name FROM customers", db) == 1.0


def test_free_text_metrics_and_eos_rate():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert 0 < rouge_l(["the cat sat down"], ["the cat sat"]) < 1
    assert chrf(["bonjour"], ["bonjour"]) == pytest.approx(1.0)
    assert chrf(["xyz"], ["bonjour"]) < 0.1
    s = score(["a", "b"], ["a", "c"], [True, False], ["exact_match", "rouge_l", "chrf"], None)
    assert s["exact_match"] == 0.5 and s["eos_rate"] == 0.5 and set(s) == {"eos_rate", "exact_match", "rouge_l", "chrf"}


def test_sql_exact_match_folds_case_and_spacing_but_not_literals():
    ref = 'SELECT count(*) FROM singer WHERE country = "France"'
    assert sql_exact_match('select COUNT( * )  from SINGER where Country = "France";', ref) == 1.0
    assert sql_exact_match("SELECT name , age FROM singer", "select name, age from singer") == 1.0
    assert sql_exact_match('SELECT count(*) FROM singer WHERE country = "france"', ref) == 0.0  # literal case
    assert sql_exact_match("SELECT count(*) FROM singer WHERE country = 'it''s  here'",
                           "SELECT count(*) FROM singer WHERE country = 'it''s here'") == 0.0  # inside quotes
    assert sql_exact_match("SELECT name FROM singer", "SELECT name FROM singers") == 0.0
    assert normalize_sql("SELECT  T1.Name FROM singer AS T1 ;") == "select t1.name from singer as t1"
    # exact_match keeps case, as before: the demo's metric does not change
    assert exact_match("select name from singer", "SELECT name FROM singer") == 0.0


def test_sql_runs_needs_one_statement_that_runs(db):
    assert sql_runs("SELECT name FROM customers WHERE age > 99", db) == 1.0  # no rows, still runs
    assert sql_runs("SELECT name FROM customers;", db) == 1.0
    assert sql_runs("SELECT nickname FROM customers", db) == 0.0  # no such column
    assert sql_runs("SELEC name FROM customers", db) == 0.0
    assert sql_runs("", db) == 0.0 and sql_runs(" ; ", db) == 0.0  # sqlite would run an empty statement
    assert sql_runs("SELECT 1; SELECT 2", db) == 0.0
    assert sql_runs("DELETE FROM customers", db) == 0.0  # read-only


def test_execution_accuracy_reports_its_sql_companions(db):
    s = score(["SELECT name FROM customers", "SELECT nme FROM customers", "select CITY from customers"],
              ["SELECT name FROM customers", "SELECT name FROM customers", "SELECT city FROM customers"],
              [True] * 3, ["exact_match", "execution_accuracy"], db)
    assert s == {"eos_rate": 1.0, "exact_match": 1 / 3, "execution_accuracy": 2 / 3, "sql_runs": 2 / 3,
                 "sql_exact_match": 2 / 3}


def test_record_databases_from_a_folder_name_every_missing_one(tmp_path, db):
    folder = tmp_path / "dbs"
    folder.mkdir()
    (folder / "shop.sqlite").write_bytes(open(db, "rb").read())
    records = [{"id": "a", "meta": '{"db_id": "shop"}'}, {"id": "b", "meta": {"db_id": "shop"}}]
    assert record_databases(records, str(folder), "db_id") == [str(folder / "shop.sqlite")] * 2
    assert record_databases(records, db, "db_id") == [db, db]  # one file: every record's database
    bad = [{"id": "c", "meta": '{"db_id": "zoo"}'}, {"id": "d", "meta": "{}"}, {"id": "e"},
           {"id": "f", "meta": '{"db_id": "../shop"}'}]
    with pytest.raises(DataValidationError) as e:
        record_databases(records + bad, str(folder), "db_id")
    message = str(e.value)
    assert "zoo.sqlite does not exist" in message and "eval.db_field" in message
    assert all(f"record {r} " in message for r in "def")
