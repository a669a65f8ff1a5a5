"""Tokenize-stage throughput against the raw fast tokenizer on the same text.

    python benchmarks/tokenize_speed.py [--records 100000] [--num-proc 2]

Generates alpaca-like chat records (seeded), runs the stage's record encoder (chat template rendering,
per-turn label masking, one batched tokenizer call per chunk) over them, and in the same run calls the
raw fast tokenizer, ``tokenizer(batch)``, on the fully rendered texts. Both run in ``--num-proc``
processes, each loading its own tokenizer. Prints tokens/s of both and the ratio (the stage should
reach at least 0.8 of the raw rate). Caching of the stage is Flyte's (tests/test_workflow_e2e.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a of to and in is for that with on as it by this be are from or at an model data query table "
         "customer order product price city age value result return select where group count list name").split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 150)))
        out.append({"format": "alpaca", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def _stage_chunk(args: tuple) -> int:
    from transformers import AutoTokenizer

    from qloraflow.tokenize import encode_records

    tok_dir, template, records = args
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = []
    for i in range(0, len(records), 1000):
        rows += encode_records(records[i:i + 1000], tok, template, "completions")
    return sum(len(r["input_ids"]) for r in rows)


def _raw_chunk(args: tuple) -> int:
    from transformers import AutoTokenizer

    tok_dir, texts = args
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return sum(len(ids) for i in range(0, len(texts), 1000)
               for ids in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"])


def timed_parallel(fn, chunks: list[tuple], procs: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        tokens = sum(pool.map(fn, chunks))
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=2)
    a = ap.parse_args()
    from qloraflow.demo import build_tokenizer
    from qloraflow.tokenize import TEMPLATES

    records = make_records(a.records)
    tmp = Path(tempfile.mkdtemp())
    tok = build_tokenizer([" ".join(WORDS)] * 50 + [m["content"] for r in records[:2000] for m in r["messages"]], 4096)
    tok.save_pretrained(tmp / "tok")
    template = TEMPLATES["chatml"]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, chat_template=template) for r in records]
    size = (len(records) + a.num_proc - 1) // a.num_proc
    raw_tokens, raw_s = timed_parallel(_raw_chunk, [(str(tmp / "tok"), texts[i:i + size])
                                                    for i in range(0, len(texts), size)], a.num_proc)
    stage_tokens, stage_s = timed_parallel(_stage_chunk, [(str(tmp / "tok"), template, records[i:i + size])
                                                          for i in range(0, len(records), size)], a.num_proc)
    result = {"records": a.records, "processes": a.num_proc, "raw_tokens": raw_tokens,
              "raw_tokens_per_s": round(raw_tokens / raw_s), "stage_tokens": stage_tokens,
              "stage_tokens_per_s": round(stage_tokens / stage_s),
              "ratio": round((stage_tokens / stage_s) / (raw_tokens / raw_s), 3)}
    print(f"raw fast tokenizer : {result['raw_tokens_per_s']:>10,} tokens/s ({raw_tokens:,} tokens in {raw_s:.1f} s)")
    print(f"tokenize stage     : {result['stage_tokens_per_s']:>10,} tokens/s ({stage_tokens:,} tokens in {stage_s:.1f} s)")
    print(f"ratio stage / raw  : {result['ratio']:.3f}  (target >= 0.8)")
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
