"""Effective (non-pad) tokens/s on realistic lengths: the project's packing against Unsloth's padded recipe.

    python benchmarks/effective_throughput.py [--examples 1200] [--seq 8192] [--steps 14]

The examples have an alpaca-like length distribution (log-normal, median 250 tokens, clipped to
32..4096; a quarter of each is prompt, masked) on the random Llama-3-8B shape that
benchmarks/train.py writes. Three systems, each in its own process, on the same examples:

  peer-padded      Unsloth's own default recipe, written out like /work/shared/bench/unsloth_peer.py:
                   FastLanguageModel, r=16 all seven projections, offloaded checkpointing, PagedAdamW8bit,
                   micro-batches of 2 examples in data order, right-padded to the longer one
  project-padded   ``train_adapter`` with ``train.backend: unsloth``, ``tokenize.packing: false``
                   (micro-batch 2, padded per batch, length-grouped sampling)
  project-packed   ``train_adapter`` with ``train.backend: unsloth``, packing into rows of ``--seq``
                   (first-fit decreasing, one position-id run per example, no padding, micro-batch 1)

Effective tokens/s counts only real tokens (prompt and answer, no padding) over the timed steps
(after ``--warmup``). Prints each system's effective tokens/s, the share of padding, and the ratio of
each to peer-padded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import train as bench  # benchmarks/train.py (a script's own folder is first on sys.path)

ROOT = bench.ROOT
SYSTEMS = ("peer-padded", "project-padded", "project-packed")


def alpaca_like_examples(n: int, vocab: int, seed: int, median: int = 250, sigma: float = 1.0,
                         lo: int = 32, hi: int = 4096) -> list[dict]:
    """Tokenized examples whose lengths follow a log-normal with the given median, a long right tail."""
    rng = random.Random(seed)
    first = max(4, vocab - bench.SUB_VOCAB - 8)
    out = []
    for _ in range(n):
        length = int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))
        prompt = length // 4
        motif = [first + rng.randrange(bench.SUB_VOCAB) for _ in range(rng.randint(4, 16))]
        ids = [first + rng.randrange(bench.SUB_VOCAB) for _ in range(prompt)]
        ids += [motif[i % len(motif)] for i in range(length - prompt)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


# --------------------------------------------------------------------------------------------- peer

def run_peer(examples: list[dict], a: argparse.Namespace) -> dict:
    """Unsloth's default recipe as its examples run it: batches of 2, padded, no packing."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  - first, for its patches
    import bitsandbytes as bnb
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=4096, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=3407)
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    real = padded = 0
    t_start = None
    for step in range(a.peer_steps):
        batch = examples[2 * step: 2 * step + 2]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in batch], device="cuda")
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch], device="cuda")
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch],
                            device="cuda")
        if step == a.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            real += int(mask.sum())
            padded += mask.numel()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t_start
    return {"system": "peer-padded", "effective_tokens_per_s": real / seconds, "pad_share": 1 - real / padded,
            "steps_timed": a.peer_steps - a.warmup, "real_tokens": real, "seconds": seconds,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


# ------------------------------------------------------------------------------------------ project

def run_project(system: str, examples: list[dict], a: argparse.Namespace) -> dict:
    from qloraflow.unsloth_backend import import_unsloth

    import_unsloth()
    import datasets
    import torch
    from transformers import AutoTokenizer

    from qloraflow.config import load_config
    from qloraflow.tokenize import pack_rows
    from qloraflow.train import train_adapter

    packed = system == "project-packed"
    data = Path(a.work) / f"data-{system}"
    if packed:
        rows = pack_rows(examples, a.seq)
        micro_batch, steps = 1, min(a.steps, len(rows))
    else:
        rows = [dict(e, length=len(e["input_ids"])) for e in examples]
        micro_batch, steps = 2, a.peer_steps
    datasets.Dataset.from_list(rows).save_to_disk(str(data / "train"))
    AutoTokenizer.from_pretrained(a.model_dir).save_pretrained(data / "tokenizer")
    cfg = load_config(str(bench.CONFIG), {
        "model.base_model": a.model_dir, "train.backend": "unsloth", "train.max_steps": steps,
        "train.micro_batch_size": micro_batch, "train.gradient_accumulation_steps": 1,
        "tokenize.sequence_len": a.seq if packed else 4096, "tokenize.packing": packed, "lora.dropout": 0,
        "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 10**9})
    rec = bench.StepRecorder()
    torch.cuda.reset_peak_memory_stats()
    train_adapter(cfg, data, Path(a.work) / f"out-{system}", tracker=rec)
    warm = [s for s in rec.steps if s["step"] > a.warmup]
    real = warm[-1]["num_input_tokens_seen"] - warm[0]["num_input_tokens_seen"]
    seconds = warm[-1]["t"] - warm[0]["t"]
    return {"system": system, "effective_tokens_per_s": real / seconds,
            "pad_share": None if packed else _pad_share(rows, micro_batch),
            "steps_timed": warm[-1]["step"] - warm[0]["step"], "real_tokens": real, "seconds": seconds,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "rows": len(rows)}


def _pad_share(rows: list[dict], micro_batch: int) -> float:
    """Padding share of batches in data order (the trainer's length grouping pads less than this)."""
    real = sum(len(r["input_ids"]) for r in rows)
    total = sum(micro_batch * max(len(r["input_ids"]) for r in rows[i:i + micro_batch])
                for i in range(0, len(rows), micro_batch))
    return 1 - real / total


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--examples", type=int, default=1200)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=14, help="steps of the packed system")
    ap.add_argument("--peer-steps", type=int, default=60, help="steps of the padded systems (2 examples each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model-dir", default="/tmp/rand-8b")
    ap.add_argument("--work", default="/tmp/qf-bench-effective")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per system")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work)
    examples_file = work / "examples.json"
    if a.child:
        examples = json.loads(examples_file.read_text())
        r = run_peer(examples, a) if a.child == "peer-padded" else run_project(a.child, examples, a)
        (work / f"result-{a.child}.json").write_text(json.dumps(r))
        return

    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, bench.__file__, "--prepare-only", "--seq", "128", "--steps", "1",
                    "--micro-batch", "1", "--model-dir", a.model_dir, "--work", str(work / "prep")], check=True)
    examples = alpaca_like_examples(a.examples, bench.SHAPES["8b"]["vocab_size"], seed=0)
    examples_file.write_text(json.dumps(examples))
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"{len(examples)} examples: median {lengths[len(lengths) // 2]} tokens, p90 {lengths[int(0.9 * len(lengths))]}, "
          f"max {lengths[-1]}", flush=True)
    results = {}
    for system in a.systems.split(","):
        out = work / f"result-{system}.json"
        out.unlink(missing_ok=True)
        args = ["--child", system, "--examples", str(a.examples), "--seq", str(a.seq), "--steps", str(a.steps),
                "--peer-steps", str(a.peer_steps), "--warmup", str(a.warmup), "--model-dir", a.model_dir,
                "--work", str(work)]
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), *args], timeout=a.timeout)
        except subprocess.TimeoutExpired:
            pass
        results[system] = json.loads(out.read_text()) if out.exists() else None
        print("RESULT " + json.dumps(results[system]), flush=True)
    peer = (results.get("peer-padded") or {}).get("effective_tokens_per_s")
    print(f"{'system':>15} {'effective tok/s':>15} {'padding':>8} {'reserved':>9} {'x peer-padded':>13}")
    for system, r in results.items():
        if not r:
            print(f"{system:>15} {'failed':>15}")
            continue
        pad = "-" if r["pad_share"] is None else f"{r['pad_share']:.0%}"
        ratio = r["effective_tokens_per_s"] / peer if peer else float("nan")
        print(f"{system:>15} {r['effective_tokens_per_s']:>15,.0f} {pad:>8} {r['peak_reserved_gib']:>5.1f} GiB "
              f"{ratio:>13.2f}")


if __name__ == "__main__":
    main()
