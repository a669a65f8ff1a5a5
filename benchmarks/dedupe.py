"""Near-duplicate removal throughput, memory and accuracy: qloraflow.dedupe vs datasketch as documented.

Synthetic alpaca-like records (~150 words: a templated instruction, an input and an answer, words
drawn Zipf-like from a 30,000-word vocabulary) with 10% planted near duplicates (a copy of an
earlier record with one or two words replaced). Each (method, size) runs in a fresh child process,
so its peak memory (``ru_maxrss``; the worker's is shown apart) is its own. CPU time per record is
shown beside wall-clock throughput: on a shared machine it is the steadier figure::

    python benchmarks/dedupe.py                    # 10k, 100k, 1M
    python benchmarks/dedupe.py 10000 100000 --baseline-max 100000
    python benchmarks/dedupe.py 10000 --shared-line-records 0   # full texts only, as before issue 17

The datasketch baseline is the way its documentation shows: one process, ``MinHash(num_perm=128)``
and ``update_batch`` per record over its word 3-grams, ``MinHashLSH(threshold, num_perm)``, query
before insert, a record with any candidate is a duplicate. Timings cover deduplication only (the
records are generated first). qloraflow runs as the data stage does, with
``data.near_dup_shared_line_records`` (each of the six instruction lines is in ~1/6 of the records,
so they are shared text and every record is compared on the rest). A table goes to stdout, then
one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from qloraflow.config import DataConfig

NUM_PERM = 128
THRESHOLD = 0.8
DUP_SHARE = 0.10
INSTRUCTIONS = ["Summarise the following text", "Explain the passage below to a beginner",
                "Translate the paragraph into plain English", "List the key points of this article",
                "Write a short answer to the question about the text", "Classify the sentiment of the review"]


def generate(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` record texts and, for each, the index of the record it was copied from (-1: original).

    Random draws are made for all records at once (numpy), so 1M records take seconds, not minutes.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 11, 30_000)
    chars = (rng.integers(0, 26, int(sizes.sum())) + ord("a")).astype(np.uint8).tobytes().decode()
    ends = np.cumsum(sizes)
    vocab = np.array([chars[e - k: e] for e, k in zip(ends, sizes)], dtype=object)
    cum = np.cumsum(1.0 / (np.arange(len(vocab)) + 10))  # Zipf-like word frequencies
    is_copy = rng.random(n) < DUP_SHARE
    is_copy[0] = False
    lengths = np.where(is_copy, 0, rng.integers(110, 171, n))
    words = vocab[np.searchsorted(cum, rng.random(int(lengths.sum())) * cum[-1])].tolist()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    cuts, instructions = rng.integers(30, 61, n), rng.integers(len(INSTRUCTIONS), size=n)
    originals = np.flatnonzero(~is_copy)
    # A copy's base: uniform over the originals before it.
    bases = originals[(rng.random(n) * np.cumsum(~is_copy)).astype(np.int64)]
    n_changes, positions = rng.integers(1, 3, n), rng.random((n, 2))
    replacements = rng.integers(len(vocab), size=(n, 2))
    texts: list[str] = []
    for i in range(n):
        if is_copy[i]:
            copy = texts[bases[i]].split(" ")
            for c in range(n_changes[i]):
                copy[int(positions[i, c] * len(copy))] = vocab[replacements[i, c]]
            texts.append(" ".join(copy))
            continue
        body, cut = words[starts[i]: starts[i + 1]], cuts[i]
        texts.append(f"{INSTRUCTIONS[instructions[i]]}\n{' '.join(body[:cut])}\n{' '.join(body[cut:])}")
    return texts, [int(bases[i]) if is_copy[i] else -1 for i in range(n)]


def run_ours(texts: list[str], workers: int | None, shared_line_records: int) -> list[bool]:
    from qloraflow.dedupe import dedupe_texts

    result = dedupe_texts(texts, threshold=THRESHOLD, num_perm=NUM_PERM, shingle_size=3, num_workers=workers,
                          shared_line_records=shared_line_records)
    return [not k for k in result.kept]


def run_datasketch(texts: list[str]) -> list[bool]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    removed = []
    for i, text in enumerate(texts):
        words = text.lower().split()
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([" ".join(words[j: j + 3]).encode("utf-8") for j in range(max(len(words) - 2, 1))])
        if lsh.query(m):
            removed.append(True)
        else:
            lsh.insert(i, m)
            removed.append(False)
    return removed


def child(method: str, n: int, workers: int | None, shared_line_records: int) -> dict:
    """One measurement, in this (fresh) process."""
    import datasketch  # noqa: F401  # imported before timing, by both methods (scipy: ~1 s)

    t0 = time.perf_counter()
    texts, source = generate(n)
    gen_s = time.perf_counter() - t0
    rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    removed = run_ours(texts, workers, shared_line_records) if method == "qloraflow" else run_datasketch(texts)
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    planted = [s >= 0 for s in source]
    hit = sum(r and p for r, p in zip(removed, planted))
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "method": method, "records": n, "seconds": round(elapsed, 2), "records_per_s": round(n / elapsed),
        "cpu_seconds": round(cpu, 2), "cpu_us_per_record": round(1e6 * cpu / n, 1),
        "precision": round(hit / max(sum(removed), 1), 4), "recall": round(hit / max(sum(planted), 1), 4),
        "planted": sum(planted), "removed": sum(removed),
        # The worker is forked after generation, so its peak also counts pages it shares with this
        # process (the texts): adding the two would count those twice.
        "peak_rss_mib": round(self_kb / 1024), "worker_peak_rss_mib": round(workers_kb / 1024),
        "rss_after_generation_mib": round(rss_gen / 1024), "dedupe_rss_mib": round((self_kb - rss_gen) / 1024),
        "generation_s": round(gen_s, 1), "cpus": len(os.sched_getaffinity(0)),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: a figure that other load on the machine
    does not inflate the way it inflates wall time."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(method: str, n: int, workers: int | None, shared_line_records: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), "--shared-line-records", str(shared_line_records)]
    cmd += ["--workers", str(workers)] if workers is not None else []
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this checkout's qloraflow
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{method} at {n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--baseline-max", type=int, default=100_000,
                    help="largest size the datasketch baseline runs at (it does ~1,000-4,000 records/s)")
    ap.add_argument("--workers", type=int, default=None, help="qloraflow worker processes (default: CPUs - 1)")
    ap.add_argument("--shared-line-records", type=int, default=DataConfig().near_dup_shared_line_records,
                    help="qloraflow: records a line must be in to be shared text (0: compare full texts; "
                         "default: the data stage's)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.workers, args.shared_line_records)))
        return

    rows = []
    print(_header(), flush=True)
    for n in args.sizes:
        ours = measure("qloraflow", n, args.workers, args.shared_line_records)
        base = measure("datasketch", n, None, 0) if n <= args.baseline_max else None
        rows.append({"records": n, "qloraflow": ours, "datasketch": base,
                     "speedup": round(ours["records_per_s"] / base["records_per_s"], 2) if base else None})
        print(_row(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "dedupe", "threshold": THRESHOLD, "num_perm": NUM_PERM,
                      "shared_line_records": args.shared_line_records, "results": rows}))


def _header() -> str:
    return (f"{'records':>9} | {'ours rec/s':>10} {'cpu us':>6} {'peak MiB':>8} {'worker':>6} {'prec':>5} "
            f"{'recall':>6} | "
            f"{'datasketch rec/s':>16} {'cpu us':>6} {'peak MiB':>8} {'prec':>5} {'recall':>6} | {'speedup':>7}\n"
            + "-" * 122)


def _row(r: dict) -> str:
    o, b = r["qloraflow"], r["datasketch"]
    right = (f"{b['records_per_s']:>16,} {b['cpu_us_per_record']:>6.0f} {b['peak_rss_mib']:>8,} {b['precision']:>5.3f} "
             f"{b['recall']:>6.3f} | {r['speedup']:>6.2f}x") if b else f"{'(not run)':>16}" + " " * 30 + "|"
    return (f"{r['records']:>9,} | {o['records_per_s']:>10,} {o['cpu_us_per_record']:>6.0f} {o['peak_rss_mib']:>8,} "
            f"{o['worker_peak_rss_mib']:>6,} {o['precision']:>5.3f} {o['recall']:>6.3f} | {right}")


if __name__ == "__main__":
    main()
