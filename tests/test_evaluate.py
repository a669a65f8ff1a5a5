"""Task metrics: exact match, SQL execution accuracy against a real SQLite database, ROUGE-L, chrF."""

import sqlite3

import pytest

from qloraflow.evaluate import chrf, execution_match, exact_match, rouge_l, score


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


def test_comparison_plot_is_a_png(tmp_path):
    from qloraflow.evaluate import comparison_png

    path = comparison_png({"base": {"exact_match": 0.0, "eos_rate": 0.1}, "candidate": {"exact_match": 0.8,
                                                                                        "eos_rate": 1.0}},
                          tmp_path / "c.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
