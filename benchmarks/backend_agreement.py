"""Same learning from both backends: per-step loss of ``hf`` and ``unsloth`` from one initial adapter.

    python benchmarks/backend_agreement.py [--steps 50] [--seq 2048] [--micro-batch 2] [--lr 1e-3]

Both backends train the same random Llama-3-8B-shaped model (benchmarks/train.py writes it) through
``train_adapter`` with the llama3-8b-qlora-a10g.yaml settings, LoRA dropout 0 (dropout draws differ
between the stacks), the same batches in the same order (the trainer's seeded sampler) and the same
initial adapter: one process builds the ``hf`` model, saves its fresh LoRA weights, and both runs
start from them through ``lora.init_adapter``. The rows carry a learnable pattern, and the learning
rate is high enough that the loss falls, so agreeing losses mean agreeing training, not two flat
lines. Prints every step's two losses and their relative difference; exits 1 when any of the first
``--steps`` differs by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import train as bench  # benchmarks/train.py (a script's own folder is first on sys.path)

ROOT = bench.ROOT


def bench_args(a: argparse.Namespace, backend: str) -> argparse.Namespace:
    sets = ["lora.dropout=0", f"train.learning_rate={a.lr}", "train.warmup_ratio=0",
            f"lora.init_adapter={Path(a.work) / 'init-adapter'}"]
    return bench.run_args(backend=backend, shape=a.shape, seq=a.seq, micro_batch=a.micro_batch, steps=a.steps,
                          warmup=1, model_dir=a.model_dir, work=a.work, one_doc=True, set=sets)


def child(a: argparse.Namespace) -> None:
    if a.child == "unsloth":
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()
    ns = bench_args(a, "hf" if a.child == "init" else a.child)
    if a.child == "init":
        import torch
        import yaml
        from transformers import set_seed

        from qloraflow import train as T
        from qloraflow.config import load_config

        bench.prepare(ns)
        overrides = {"model.base_model": a.model_dir, "tokenize.sequence_len": a.seq, "lora.dropout": 0,
                     "train.use_cpu": not torch.cuda.is_available()}
        cfg = load_config(ns.config, overrides)
        set_seed(cfg.seed)
        T.build_model(cfg, "hf").save_pretrained(Path(a.work) / "init-adapter")
        print(yaml.safe_dump({"init_adapter": str(Path(a.work) / "init-adapter")}), flush=True)
        return
    r = bench.run(ns)
    Path(a.json).write_text(json.dumps({"losses": [s["loss"] for s in r["per_step"]], "tokens_per_s": r["tokens_per_s"]}))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--model-dir", default="/tmp/rand-8b")
    ap.add_argument("--work", default="/tmp/qf-bench-agree")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per backend")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return

    common = ["--steps", str(a.steps), "--seq", str(a.seq), "--micro-batch", str(a.micro_batch), "--lr", str(a.lr),
              "--shape", a.shape, "--model-dir", a.model_dir, "--work", a.work]
    subprocess.run([sys.executable, __file__, "--child", "init", *common], check=True, timeout=a.timeout)
    losses = {}
    for backend in ("hf", "unsloth"):
        out = Path(a.work) / f"losses-{backend}.json"
        out.unlink(missing_ok=True)
        subprocess.run([sys.executable, __file__, "--child", backend, "--json", str(out), *common], timeout=a.timeout)
        losses[backend] = json.loads(out.read_text()) if out.exists() else {"losses": [], "tokens_per_s": None}

    hf, us = losses["hf"]["losses"], losses["unsloth"]["losses"]
    n = min(len(hf), len(us), a.steps)
    print(f"{'step':>4} {'hf loss':>9} {'unsloth loss':>12} {'rel diff':>8}")
    worst = 0.0
    for i in range(n):
        rel = abs(hf[i] - us[i]) / abs(hf[i])
        worst = max(worst, rel)
        print(f"{i + 1:>4} {hf[i]:>9.4f} {us[i]:>12.4f} {rel:>8.2%}")
    ok = n == a.steps and worst <= a.tolerance
    print(f"steps compared {n}/{a.steps}; loss {hf[0]:.3f} -> {hf[n - 1]:.3f} (hf), {us[0]:.3f} -> {us[n - 1]:.3f} "
          f"(unsloth); largest relative difference {worst:.2%} (tolerance {a.tolerance:.0%}): "
          f"{'AGREE' if ok else 'DISAGREE'}" if n else "no steps to compare")
    print("RESULT " + json.dumps({"steps": n, "max_rel_diff": worst, "hf_tokens_per_s": losses["hf"]["tokens_per_s"],
                                  "unsloth_tokens_per_s": losses["unsloth"]["tokens_per_s"], "hf": hf, "unsloth": us}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
