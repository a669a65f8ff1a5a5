"""Multi-GPU scaling of the project's training function: the same QLoRA run on 1 GPU, then on N.

    python benchmarks/train_elastic.py                         # N = every visible GPU (at least 2)
    python benchmarks/train_elastic.py --gpus 2 --seq 2048 --micro-batch 2 --steps 20
    python benchmarks/train_elastic.py --distributed fsdp      # FSDP-QLoRA instead of DDP (adamw_torch)
    python benchmarks/train_elastic.py --shape tiny --seq 256 --steps 8 --gpus 2   # a smoke run

Each run is ``torchrun --standalone --nproc-per-node K`` over this file, whose workers call
``qloraflow.train.train_adapter`` exactly as the Flyte Elastic task's workers do (no flytekit or
MLflow needed). The model is benchmarks/train.py's Llama-3-8B shape with random weights, with the
settings of configs/llama3-8b-qlora-a10g.yaml; the data are its synthetic rows of exactly ``--seq``
tokens, so every optimiser step trains ``seq x micro-batch x grad-accum x K`` tokens.

Printed per run: steady-state tokens/s in total and per GPU (steps after ``--warmup``), MFU per GPU
against 790 TFLOP/s, peak reserved memory of rank 0's GPU, the loss at the first and last step; then
the scaling efficiency, tokens/s per GPU on N GPUs over tokens/s on one (1.0 is linear scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import train as bench  # benchmarks/train.py (a script's own folder is first on sys.path)


def prepare(args: argparse.Namespace) -> None:
    """The random model (once) and enough rows for the largest run."""
    import datasets
    from transformers import AutoTokenizer

    model_dir, data_dir = Path(args.model_dir), Path(args.work) / "data"
    if not (model_dir / "config.json").exists() or not (model_dir / "tokenizer.json").exists():
        bench.make_model(args.shape, model_dir)
    n_rows = args.steps * args.micro_batch * args.grad_accum * args.gpus
    rows = bench.synthetic_rows(n_rows, args.seq, bench.SHAPES[args.shape]["vocab_size"], seed=0)
    shutil.rmtree(data_dir, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(data_dir / "train"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(data_dir / "tokenizer")
    print(f"wrote {n_rows} rows of {args.seq} tokens", flush=True)


# ------------------------------------------------------------------------------------------- worker

def worker(args: argparse.Namespace) -> None:
    """One torchrun process: train, and on rank 0 write the measurement to ``--result``."""
    import torch

    from qloraflow.config import load_config
    from qloraflow.train import train_adapter, world_size

    world = world_size()
    overrides = {
        "model.base_model": str(args.model_dir), "train.backend": "hf", "train.max_steps": args.steps,
        "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": args.grad_accum,
        "tokenize.sequence_len": args.seq, "train.logging_steps": 1, "train.eval_steps": 0,
        "train.save_steps": 10**9, "train.use_cpu": not torch.cuda.is_available(),
        "train.num_gpus": world, "train.distributed": args.distributed,
    }
    if args.distributed == "fsdp":  # what FSDP-QLoRA needs; the 1-GPU run uses the same, for a fair ratio
        overrides.update({"model.upcast_unquantized_fp32": False, "train.optimizer": "adamw_torch"})
    cfg = load_config(args.config, overrides)
    rec = bench.StepRecorder()
    out = Path(args.work) / f"out-{world}"
    summary = train_adapter(cfg, Path(args.work) / "data", out, tracker=rec)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    warm = [s for s in rec.steps if s["step"] > args.warmup]
    tokens_per_step = args.seq * args.micro_batch * args.grad_accum * world
    steady = None
    if len(warm) >= 2:
        steady = tokens_per_step * (warm[-1]["step"] - warm[0]["step"]) / (warm[-1]["t"] - warm[0]["t"])
    gpu = torch.cuda.is_available()
    per_gpu = steady / world if steady else None
    result = {
        "gpus": world, "distributed": args.distributed if world > 1 else "none", "shape": args.shape,
        "seq": args.seq, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "steps": summary["global_step"], "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(steady) if steady else None,
        "tokens_per_s_per_gpu": round(per_gpu) if per_gpu else None,
        "mfu_per_gpu": round(per_gpu * bench.flops_per_token(bench.SHAPES[args.shape], args.seq) / bench.PEAK_FLOPS, 3)
        if per_gpu and gpu else None,
        "peak_reserved_gib_rank0": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None,
        "loss_first": rec.steps[0]["loss"] if rec.steps else None,
        "loss_last": rec.steps[-1]["loss"] if rec.steps else None,
        "replicas_agree": len(set(summary["adapter_sha256_by_rank"])) == 1 if world > 1 and args.distributed == "ddp"
        else None,
        "gpu": torch.cuda.get_device_name(0) if gpu else "cpu", "versions": bench.versions(),
    }
    Path(args.result).write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------- parent

def launch(args: argparse.Namespace, nproc: int, passthrough: list[str]) -> dict[str, Any]:
    """``torchrun --standalone --nproc-per-node nproc`` over this file; rank 0's measurement."""
    result = Path(args.work) / f"result-{nproc}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(Path(args.work) / f"out-{nproc}", ignore_errors=True)  # train_adapter would resume from it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(__file__), "--worker", "--result", str(result), *passthrough]
    t = time.time()
    subprocess.run(cmd, check=True)
    out = json.loads(result.read_text())
    out["wall_s"] = round(time.time() - t, 1)
    print("RUN " + json.dumps({k: v for k, v in out.items() if k != "versions"}), flush=True)
    return out


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less the given options and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=None, help="N for the multi-GPU run; default: every visible GPU")
    ap.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--config", default=str(bench.CONFIG))
    ap.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--model-dir", default=None, help="random model folder; default /tmp/rand-SHAPE")
    ap.add_argument("--work", default="/tmp/qf-bench-elastic")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.model_dir = args.model_dir or f"/tmp/rand-{args.shape}"
    if args.worker:
        worker(args)
        return
    if args.prepare_only:
        prepare(args)
        return
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    if args.gpus < 2:
        raise SystemExit(f"needs at least 2 GPUs to measure scaling (--gpus {args.gpus})")
    passthrough = _without(argv, "--gpus", "--model-dir", "--work")
    passthrough += ["--gpus", str(args.gpus), "--model-dir", args.model_dir, "--work", args.work]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    # Model and data are written by a child process: the random 8B model is built on a GPU.
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare-only", *passthrough], check=True)
    one, many = launch(args, 1, passthrough), launch(args, args.gpus, passthrough)
    efficiency = None
    if one["tokens_per_s_per_gpu"] and many["tokens_per_s_per_gpu"]:
        efficiency = round(many["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 3)
    summary = {"distributed": args.distributed, "gpus": args.gpus,
               "tokens_per_s_per_gpu": {1: one["tokens_per_s_per_gpu"], args.gpus: many["tokens_per_s_per_gpu"]},
               "tokens_per_s": {1: one["tokens_per_s"], args.gpus: many["tokens_per_s"]},
               "scaling_efficiency": efficiency, "replicas_agree": many["replicas_agree"]}
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": [one, many]}, indent=1))
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
