"""Digests of the tokenize stage's output on fixed inputs: proof that a faster stage writes the same bytes.

    python benchmarks/tokenize_identity.py --save before.json   # on the code before a change
    python benchmarks/tokenize_identity.py --check before.json  # after it: exits 1 naming what differs

Fixed, seeded records (single and multi-turn chats, system messages, inline ``<think>`` reasoning,
completions, a template that rewrites earlier turns, over-long records) go through the whole stage:
``tokenize_dataset`` with ``num_proc`` 1 and 2, and the sharded path (``tokenize_shard`` per shard, then
``merge_tokenize_shards``). What is hashed: every file the stage writes (the Arrow files of each split,
the shards' ``encoded.parquet``, ``report.json``, the saved tokenizer) byte for byte, except the
``datasets`` fingerprint in ``state.json``, which is random per save. The tokenizers are the offline BPE
of the demo and, when ``make assets-real`` has fetched them, the Llama 3 tokenizer with the official
Llama 3.1 and Qwen3 templates.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a of to and in is for that with on as it by this be are from or at an model data query table "
         "customer order product price city age value result return select where group count list name "
         "Paris Lyon 42 SELECT * FROM ; ( ) = ' \n").split(" ")
# ChatML that, like Qwen3, drops the <think> reasoning of assistant turns before the last one.
DROPS_OLD_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_records(n: int, seed: int) -> list[dict]:
    """Records of every shape the stage cuts differently, in a seeded mix."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    out = []
    for i in range(n):
        kind = rng.choice(["alpaca", "system", "multi", "thinking", "completion", "long"])
        msgs = [{"role": "system", "content": text(3, 10)}] if kind in ("system", "multi") else []
        for _ in range(rng.randint(2, 3) if kind in ("multi", "thinking") else 1):
            answer = rng.choice(["SELECT", "ok", "The"]) + " " + text(0, 40)
            if kind == "thinking":
                answer = f"<think>\n{text(2, 12)}\n</think>\n\n{answer}"
            msgs += [{"role": "user", "content": text(1, 30)}, {"role": "assistant", "content": answer}]
        if kind == "long":
            msgs[-1]["content"] = text(300, 500)
        fmt = "completion" if kind == "completion" else "messages"
        out.append({"id": f"r{seed}-{i}", "source": f"data/in.jsonl:{i + 1}", "format": fmt, "messages": msgs})
    return out


def write_splits(folder: Path, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
                        ("messages", pa.list_(message))])
    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate({"train": 2000, "validation": 60, "test": 60}.items()):
        pq.write_table(pa.Table.from_pylist(make_records(n, seed * 10 + k), schema=schema), folder / f"{split}.parquet")


def digest_tree(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "state.json":
            state = json.loads(data)
            state.pop("_fingerprint", None)
            data = json.dumps(state, sort_keys=True).encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()[:16]
    return out


def tokenizers() -> dict[str, tuple]:
    """name -> (tokenizer, template) for every tokenizer available offline."""
    from qloraflow import assets
    from qloraflow.tinymodel import build_tokenizer
    from qloraflow.tokenize import TEMPLATES

    corpus = [" ".join(WORDS)] * 20 + [r["messages"][-1]["content"] for r in make_records(400, 99)]
    bpe = build_tokenizer(corpus, 600)
    out = {f"bpe-{name}": (bpe, TEMPLATES[name]) for name in ("chatml", "alpaca", "llama-3")}
    out["bpe-own"] = (bpe, bpe.chat_template)
    out["bpe-drops-reasoning"] = (bpe, DROPS_OLD_REASONING)
    if assets.is_fetched("llama3-tokenizer") and assets.is_fetched("llama-cpp"):
        from tokenizers import AddedToken

        from qloraflow.templates import build_llama3_tokenizer

        templates = assets.fetch("llama-cpp") / "models" / "templates"
        llama3 = build_llama3_tokenizer(assets.fetch("llama3-tokenizer"))
        out["llama3.1"] = (llama3, (templates / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
        qwen = copy.deepcopy(llama3)
        qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        qwen.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
        qwen.eos_token = "<|im_end|>"
        out["qwen3"] = (qwen, (templates / "Qwen-Qwen3-0.6B.jinja").read_text())
    return out


def run_stage(tok, template: str, train_on: str, root: Path) -> dict[str, dict[str, str]]:
    from qloraflow import shard
    from qloraflow.config import TokenizeConfig
    from qloraflow.tokenize import merge_tokenize_shards, tokenize_dataset, tokenize_shard

    base = root / "base"
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    tok.save_pretrained(base)
    data = root / "data"
    write_splits(data, seed=1)
    out = {}
    for num_proc in (1, 2):
        cfg = TokenizeConfig(sequence_len=512, train_on=train_on, num_proc=num_proc)
        tokenize_dataset(cfg, data, base, root / f"whole-{num_proc}")
        out[f"whole-{num_proc}"] = digest_tree(root / f"whole-{num_proc}")
    cfg = TokenizeConfig(sequence_len=512, train_on=train_on, overlong="drop", packing=False)
    parts = [tokenize_shard(cfg, s, data, base, root / "parts" / str(k))
             for k, s in enumerate(shard.plan_tokenize_shards(data, num_shards=3))]
    merge_tokenize_shards(cfg, parts, data, base, root / "sharded")
    out["sharded"] = digest_tree(root / "sharded")
    out["parts"] = digest_tree(root / "parts")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--check", type=Path)
    a = ap.parse_args()
    result = {}
    for name, (tok, template) in tokenizers().items():
        for train_on in ("completions", "all"):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    result[f"{name}/{train_on}"] = run_stage(tok, template, train_on, Path(tmp))
                except Exception as e:  # a refusal is output too: it must stay the same
                    result[f"{name}/{train_on}"] = {"error": {type(e).__name__: str(e)}}
            print(f"{name}/{train_on}: {len(json.dumps(result[f'{name}/{train_on}']))} bytes of digests", flush=True)
    if a.save:
        a.save.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"saved {len(result)} cases to {a.save}")
        return
    before = json.loads(a.check.read_text())
    diffs = [f"{case} {run} {path}" for case in sorted(set(before) | set(result))
             for run in sorted(set(before.get(case, {})) | set(result.get(case, {})))
             for path in sorted(set(before.get(case, {}).get(run, {})) | set(result.get(case, {}).get(run, {})))
             if before.get(case, {}).get(run, {}).get(path) != result.get(case, {}).get(run, {}).get(path)]
    print("\n".join(diffs) or f"identical: {len(result)} cases, every file")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
