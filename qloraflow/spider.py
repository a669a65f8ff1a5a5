"""Spider (text-to-SQL) as alpaca records, split by database, with empty SQLite databases to run SQL on.

Each record's instruction is a task line and its database's schema as ``CREATE TABLE`` statements
(from ``tables.json``), its input the question and its output the gold SQL; ``db_id`` travels as an
extra field. Whole databases are held out for the test split, so a test question never shares a
schema with a training one (Spider's own protocol)::

    from qloraflow.assets import fetch
    from qloraflow.spider import write_dataset
    counts = write_dataset(fetch("spider"), "data/spider")
    # data/spider/train.jsonl, data/spider/test.jsonl, data/spider/databases/<db_id>.sqlite

``python -m qloraflow.spider OUT_DIR`` does the same from the command line (``--interleave-test`` writes
the test split in turns over its databases, for an evaluation of its first N records).
"""

from __future__ import annotations

import argparse
import functools
import json
import sqlite3
from pathlib import Path
from typing import Any, Sequence, Union

TASK_LINE = "Write a SQLite query that answers the question, using this database schema:"
# Six of the 20 dev databases (191 of 1,034 questions, 18%), of small to middling schema size and
# question count, so that a held-out evaluation is quick and no schema is seen in training.
DEFAULT_HELDOUT_DBS = ("concert_singer", "pets_1", "orchestra", "singer", "museum_visit", "battle_death")
# Spider's column types (tables.json) as SQLite declared types.
_SQL_TYPES = {"text": "TEXT", "number": "NUMBER", "time": "TIME", "boolean": "BOOLEAN", "others": "TEXT"}

PathLike = Union[str, Path]


def _load_schemas(tables_json: PathLike) -> dict[str, dict[str, Any]]:
    return {s["db_id"]: s for s in json.loads(Path(tables_json).read_text(encoding="utf-8"))}


@functools.lru_cache(maxsize=None)
def _identifier(name: str) -> str:
    """``name`` as SQLite reads it: bare where SQLite accepts it bare, else double-quoted."""
    try:
        sqlite3.connect(":memory:").execute(f"CREATE TABLE {name} ({name} TEXT)")
        return name
    except sqlite3.Error:  # a keyword, a space, a leading digit...
        return '"' + name.replace('"', '""') + '"'


def create_table_sql(schema: dict[str, Any]) -> str:
    """A database's schema as ``CREATE TABLE`` statements, one per table, in ``tables.json`` order.

    Original table and column names are used (what the gold SQL refers to), with primary and
    foreign keys; SQLite's internal tables (``sqlite_sequence``) are left out. Example, for Spider's ``singer`` database::

        CREATE TABLE singer (
          Singer_ID NUMBER,
          Name TEXT,
          ...
          PRIMARY KEY (Singer_ID)
        );
        CREATE TABLE song (
          ...
          FOREIGN KEY (Singer_ID) REFERENCES singer (Singer_ID)
        );

    Args:
        schema: One entry of Spider's ``tables.json``.

    Returns:
        The statements, separated by newlines (valid SQLite: :func:`build_databases` runs them).
    """
    tables = schema["table_names_original"]
    columns = schema["column_names_original"]  # [table index, name]; entry 0 is (-1, "*")
    types = schema["column_types"]
    primary: dict[int, list[int]] = {}
    for c in schema["primary_keys"]:
        for col in (c if isinstance(c, list) else [c]):  # newer dumps list composite keys together
            primary.setdefault(columns[col][0], []).append(col)
    foreign: dict[int, list[tuple[int, int]]] = {}
    for col, ref in schema["foreign_keys"]:
        foreign.setdefault(columns[col][0], []).append((col, ref))

    def name(col: int) -> str:
        return _identifier(columns[col][1])

    statements = []
    for t, table in enumerate(tables):
        if table.lower().startswith("sqlite_"):
            continue  # SQLite's own bookkeeping (sqlite_sequence), which it creates itself and forbids creating
        lines = [f"  {name(c)} {_SQL_TYPES.get(types[c], 'TEXT')}" for c, (owner, _) in enumerate(columns) if owner == t]
        if t in primary:
            lines.append(f"  PRIMARY KEY ({', '.join(name(c) for c in primary[t])})")
        lines += [f"  FOREIGN KEY ({name(col)}) REFERENCES {_identifier(tables[columns[ref][0]])} ({name(ref)})"
                  for col, ref in foreign.get(t, [])]
        statements.append(f"CREATE TABLE {_identifier(table)} (\n" + ",\n".join(lines) + "\n);")
    return "\n".join(statements)


def spider_records(spider_dir: PathLike, *, with_schema: bool = True) -> list[dict[str, Any]]:
    """Spider's ``dev.json`` as alpaca records, in file order.

    Example record::

        {"instruction": "Write a SQLite query that answers the question, using this database schema:\\n"
                        "CREATE TABLE stadium (\\n  Stadium_ID NUMBER, ...",
         "input": "How many singers do we have?",
         "output": "SELECT count(*) FROM singer",
         "db_id": "concert_singer"}

    Args:
        spider_dir: Folder with ``dev.json`` and ``tables.json`` (``qloraflow.assets.fetch("spider")``).
        with_schema: False leaves the schema out of the instruction (the task line only), e.g. to
            measure what the schema does to deduplication.

    Returns:
        One dict per question: instruction, input, output (the gold SQL, as Spider writes it) and db_id.
    """
    spider_dir = Path(spider_dir)
    schemas = _load_schemas(spider_dir / "tables.json")
    instructions: dict[str, str] = {}
    records = []
    for item in json.loads((spider_dir / "dev.json").read_text(encoding="utf-8")):
        db = item["db_id"]
        if db not in instructions:
            instructions[db] = f"{TASK_LINE}\n{create_table_sql(schemas[db])}" if with_schema else TASK_LINE
        records.append({"instruction": instructions[db], "input": item["question"], "output": item["query"],
                        "db_id": db})
    return records


def split_by_database(records: Sequence[dict[str, Any]], heldout_dbs: Sequence[str] = DEFAULT_HELDOUT_DBS
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of ``heldout_dbs`` go to test, the others to train; order is kept within each.

    Example::

        train, test = split_by_database(spider_records(d))            # DEFAULT_HELDOUT_DBS
        train, test = split_by_database(records, ["world_1", "car_1"])

    Raises:
        ValueError: A held-out database has no record (a typo would otherwise give an empty test split).
    """
    present = {r["db_id"] for r in records}
    unknown = sorted(set(heldout_dbs) - present)
    if unknown:
        raise ValueError(f"held-out database(s) {', '.join(unknown)} have no record; the records' db_ids are "
                         f"{', '.join(sorted(present))}")
    held = set(heldout_dbs)
    return [r for r in records if r["db_id"] not in held], [r for r in records if r["db_id"] in held]


def interleave_by_database(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in turns over their databases: each database's first question, then each one's second, ...

    The evaluation reads the first ``eval.max_samples`` records of the test split; in this order any
    prefix covers every held-out database (in proportion, until the smaller ones run out), where
    file order would give the first database's questions only. Order within a database is kept.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["db_id"], []).append(r)
    longest = max((len(g) for g in groups.values()), default=0)
    return [g[k] for k in range(longest) for g in groups.values() if k < len(g)]


def build_databases(tables_json: PathLike, out_dir: PathLike, db_ids: Sequence[str]) -> dict[str, Path]:
    """Empty SQLite databases with the schemas of ``db_ids``: ``out_dir/<db_id>.sqlite``.

    Every gold query of Spider's dev set compiles and runs against its database (a test checks all
    1,034), so an execution metric can tell a query that runs from one that does not; the tables
    are empty, so results compare only on shape. An existing file is replaced. Example::

        paths = build_databases(d / "tables.json", "dbs", ["concert_singer"])
        sqlite3.connect(paths["concert_singer"]).execute("SELECT count(*) FROM singer")

    Raises:
        KeyError: A db_id is not in ``tables.json``.
    """
    schemas = _load_schemas(tables_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for db in db_ids:
        if db not in schemas:
            raise KeyError(f"database {db!r} is not in {tables_json}")
        path = out / f"{db}.sqlite"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        con = sqlite3.connect(tmp)
        try:
            con.executescript(create_table_sql(schemas[db]))
            con.commit()
        finally:
            con.close()
        tmp.replace(path)
        paths[db] = path
    return paths


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_dataset(spider_dir: PathLike, out_dir: PathLike, heldout_dbs: Sequence[str] = DEFAULT_HELDOUT_DBS,
                  *, with_schema: bool = True, interleave_test: bool = False) -> dict[str, Any]:
    """Spider as ``out_dir/train.jsonl``, ``out_dir/test.jsonl`` and ``out_dir/databases/<db_id>.sqlite``.

    Example::

        write_dataset(fetch("spider"), "data/spider")
        # {'train': 843, 'test': 191, 'train_databases': 14, 'test_databases': 6, 'databases': {...}}

    Args:
        spider_dir: Folder with ``dev.json`` and ``tables.json``.
        out_dir: Output folder (created if missing).
        heldout_dbs: Databases whose questions form the test split.
        with_schema: Put each database's schema in the instruction (see :func:`spider_records`).
        interleave_test: Write the test split in turns over its databases (:func:`interleave_by_database`),
            so that an evaluation of its first N records sees every held-out database.

    Returns:
        Record counts per split, database counts per split, and ``databases``: db_id -> SQLite path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = split_by_database(spider_records(spider_dir, with_schema=with_schema), heldout_dbs)
    if interleave_test:
        test = interleave_by_database(test)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "test.jsonl", test)
    db_ids = list(dict.fromkeys(r["db_id"] for r in [*train, *test]))
    paths = build_databases(Path(spider_dir) / "tables.json", out / "databases", db_ids)
    return {"train": len(train), "test": len(test), "train_databases": len({r["db_id"] for r in train}),
            "test_databases": len({r["db_id"] for r in test}), "databases": {k: str(v) for k, v in paths.items()}}



def _sql_key(sql: str) -> str:
    return " ".join(sql.split()).rstrip(";").strip()


def audit_data_stage(spider_dir: PathLike, out_dir: PathLike, *, with_schema: bool = True,
                     heldout_dbs: Sequence[str] = DEFAULT_HELDOUT_DBS, data: Any = None) -> dict[str, Any]:
    """Run the data stage on Spider and judge its rejections against the gold SQL.

    Spider's questions are all distinct examples, so a near-duplicate rejection whose SQL differs
    from the kept record's removed a real example, and a gold query rejected as repetitive is a
    false alarm. What ``benchmarks/spider_dedupe.py`` prints and ``tests/test_spider.py`` asserts::

        audit_data_stage(fetch("spider"), "outputs/spider-audit", with_schema=False)
        # {'near_duplicates': 8, 'near_duplicates_other_sql': ..., 'repetitive': 0, ...}

    Args:
        spider_dir: Folder with ``dev.json`` and ``tables.json``.
        out_dir: Receives the JSONL splits (``data/``) and the data stage's outputs (``stage/``).
        with_schema: Put each database's schema in the instruction.
        heldout_dbs: Databases of the test split (``data.test_files``).
        data: A :class:`qloraflow.config.DataConfig` to run with (its files are replaced); default:
            the defaults, as a new user gets them.

    Returns:
        ``near_duplicates`` and ``exact_duplicates`` (records rejected as such),
        ``near_duplicates_other_sql`` (of those, how many had another SQL answer than the record
        kept), ``repetitive`` and ``repetitive_gold_sql`` (rejected as repetitive; of those, whose
        SQL answer is the gold query, i.e. all of them), ``shared_text_merges`` and ``shared_lines``
        (from the stage report), ``read`` and ``kept``.
    """
    import dataclasses

    from qloraflow.config import DataConfig
    from qloraflow.data import prepare_dataset

    out = Path(out_dir)
    write_dataset(spider_dir, out / "data", heldout_dbs, with_schema=with_schema)
    files = {"train_files": [str(out / "data" / "train.jsonl")], "test_files": [str(out / "data" / "test.jsonl")]}
    cfg = dataclasses.replace(data, **files) if data is not None else DataConfig(**files)
    report = prepare_dataset(cfg, out / "stage", seed=0)
    rows = {(src, n): json.loads(line) for src in [*cfg.test_files, *cfg.train_files]
            for n, line in enumerate(Path(src).read_text(encoding="utf-8").splitlines(), 1)}
    quarantine = [json.loads(line) for line in (out / "stage" / "quarantine.jsonl").read_text().splitlines()]
    near = [q for q in quarantine if q["reason"] == "near_duplicate"]
    other_sql = 0
    for q in near:
        src, line = q["duplicate_of"].rsplit(":", 1)
        other_sql += _sql_key(rows[(src, int(line))]["output"]) != _sql_key(rows[(q["source"], q["line"])]["output"])
    repetitive = [q for q in quarantine if q["reason"] == "repetitive"]
    dedupe = report["dedupe"]
    return {"read": report["read"], "kept": report["kept"], "exact_duplicates": dedupe["exact_duplicates"],
            "near_duplicates": len(near), "near_duplicates_other_sql": other_sql, "repetitive": len(repetitive),
            "repetitive_gold_sql": sum("(assistant)" in q["detail"] for q in repetitive),
            "shared_text_merges": dedupe.get("shared_text_merges", 0), "shared_lines": dedupe.get("shared_lines", 0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write Spider as alpaca JSONL splits and SQLite databases.")
    parser.add_argument("out_dir")
    parser.add_argument("--heldout", nargs="+", default=list(DEFAULT_HELDOUT_DBS), help="test databases")
    parser.add_argument("--interleave-test", action="store_true",
                        help="write the test split in turns over its databases (any first N covers all of them)")
    args = parser.parse_args(argv)
    from qloraflow.assets import fetch

    counts = write_dataset(fetch("spider"), args.out_dir, args.heldout, interleave_test=args.interleave_test)
    print(json.dumps({k: v for k, v in counts.items() if k != "databases"}))


if __name__ == "__main__":
    main()
