"""The data stage's rejections on real Spider data, judged against the gold SQL (issue 17).

Spider's dev set (1,034 question/SQL pairs over 20 databases) goes through the data stage
(``qloraflow.data.prepare_dataset``, what the Flyte data task runs) as alpaca records, six databases
held out as test files, three ways: the schema in the instruction, the task line only, and the
schema with the shared-text and short-answer rules switched off (how the stage behaved before).
Every Spider question is its own example, so a near-duplicate rejection whose SQL differs from the
kept record's removed a real one, and a gold query rejected as repetitive is a false alarm::

    python benchmarks/spider_dedupe.py
    python benchmarks/spider_dedupe.py --out outputs/spider-dedupe   # keep the stage outputs

The numbers come from ``qloraflow.spider.audit_data_stage``, the function ``tests/test_spider.py``
asserts on. A table goes to stdout, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qloraflow.assets import fetch
from qloraflow.config import DataConfig
from qloraflow.spider import audit_data_stage

RUNS = {
    "schema in instruction": dict(with_schema=True),
    "task line only (no schema)": dict(with_schema=False),
    "schema, shared-text rules off": dict(with_schema=True, data=DataConfig(near_dup_shared_line_records=0,
                                                                             near_dup_short_answer_words=0)),
}
COLUMNS = [("near_duplicates", "near dup"), ("near_duplicates_other_sql", "other SQL"), ("repetitive", "repetitive"),
           ("shared_text_merges", "shared-text merges"), ("shared_lines", "shared lines"), ("kept", "kept")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the stage outputs (default: a temporary one)")
    args = ap.parse_args()
    spider = fetch("spider")
    root = args.out or Path(tempfile.mkdtemp(prefix="spider-dedupe-"))
    results = {}
    print(f"{'run':<32} | " + " ".join(f"{label:>{max(len(label), 6)}}" for _, label in COLUMNS) + " | seconds")
    for k, (name, options) in enumerate(RUNS.items()):
        t0 = time.perf_counter()
        audit = audit_data_stage(spider, root / f"run-{k}", **options)
        audit["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = audit
        print(f"{name:<32} | " + " ".join(f"{audit[key]:>{max(len(label), 6)},}" for key, label in COLUMNS)
              + f" | {audit['seconds']:>7}")
    with_schema, without = results["schema in instruction"], results["task line only (no schema)"]
    targets = {
        "near_dups_within_2": abs(with_schema["near_duplicates"] - without["near_duplicates"]) <= 2,
        "no_other_sql_rejected": with_schema["near_duplicates_other_sql"] == 0,
        "no_gold_sql_repetitive": with_schema["repetitive_gold_sql"] == 0 == without["repetitive_gold_sql"],
    }
    print("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in targets.items()))
    print(json.dumps({"benchmark": "spider_dedupe", "records": with_schema["read"], "outputs": str(root),
                      "results": results, "targets": targets}))


if __name__ == "__main__":
    main()
