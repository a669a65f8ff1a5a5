"""QLoRA training throughput and memory of the project's own training function on one GPU.

    python benchmarks/train.py --backend hf      [--steps 30] [--seq 8192] [--micro-batch 2] [--json out.json]
    python benchmarks/train.py --backend unsloth [--steps 30] ...
    python benchmarks/train.py --backend hf --shape tiny --seq 256 --steps 4     # a smoke run, CPU or GPU

Trains a Llama-3-8B-shaped model (random weights: vocab 128256, hidden 4096, MLP 14336, 32 layers,
32 heads, 8 KV heads, the shape of /work/shared/bench/hf_qlora_baseline.py, written once to
``--model-dir``) THROUGH ``qloraflow.train.train_adapter`` with the settings of
configs/llama3-8b-qlora-a10g.yaml: NF4 double-quant, bf16, LoRA r=16 alpha=32 dropout 0.05 on
q/k/v/o/gate/up/down, paged AdamW 8-bit, cosine schedule, lr 2e-4, wd 0.01, clipping at 1.0,
gradient checkpointing, packing with the padding-free collator. What this benchmark changes, and
prints: ``max_steps`` (``--steps``), gradient accumulation (``--grad-accum``, default 1 so that every
logged step is one timed micro-batch), logging every step, no evaluation, no checkpoints.

The data are synthetic packed rows of exactly ``--seq`` tokens, each holding several examples of
random length (position ids restart at 0 for each) whose first quarter is an unlabelled prompt and
whose rest is a repeated short motif over a 512-token sub-vocabulary, so the loss has something to
learn. Printed: steady-state tokens/s (the wall time of the steps after ``--warmup``, the GPU
synchronised at both ends of that window), MFU against 790 TFLOP/s (6N
FLOPs a token, as the reference baseline counts them), peak reserved and allocated GPU memory, and
the loss at the first and last step; ``--json`` writes everything.

Model and data are written by a child process (transformers must not be imported before Unsloth, and
the random 8B model is built in fp32 on the GPU, which would otherwise count toward the peak).

Experiments (not the project's configuration; ``hf`` only):
  --attn sdpa|flex_attention|varlen   varlen: PyTorch's flash varlen kernel over the packed documents
  --fp32-upcast                       the old peft prepare_model_for_kbit_training upcast of norms,
                                      embeddings and lm_head to fp32
  --activation-offloading             train.activation_offloading: TRL's offloading of checkpointed activations
  --set KEY=VALUE                     any config override, e.g. lora.dropout=0 (the peer recipe's)
  --off host-token-count              the Trainer's own token count (a GPU sum and sync a micro-step)
  --off host-boundaries               example boundaries read off position_ids on the GPU, not the collator's
  --off unsloth-flash-varlen          Unsloth's own kernel choice for packed rows (see qloraflow/unsloth_backend.py)
  --logging-steps N                   default 1 (every step's loss, one GPU sync a step); the configs use 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

# The other benchmark scripts import this file as `train` (their folder is first on sys.path). The
# repository root goes on sys.path too, so that qloraflow imports on a GPU machine without installing it.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "llama3-8b-qlora-a10g.yaml"
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0),
}
PEAK_FLOPS = 790e12  # bf16 dense, measured on these H100/H200 machines
SUB_VOCAB = 512
OFF_SWITCHES = ("host-token-count", "host-boundaries", "unsloth-flash-varlen")  # the synthetic answers draw from this many token ids


# ---------------------------------------------------------------------------------------------- data

def make_model(shape: str, path: Path) -> None:
    """Random-weight Llama of ``shape`` in bf16 plus a small BPE tokenizer, saved like a Hub folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qloraflow.demo import build_tokenizer

    t = time.time()
    torch.manual_seed(0)  # the same weights as the reference scripts' /tmp/rand-8b
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(path)
    # Unsloth loads a tokenizer from the model folder; train_adapter uses the dataset's copy.
    build_tokenizer([f"select {w} from table {i}" for i in range(200) for w in ("a", "b", "c")], 300).save_pretrained(path)
    print(f"made random {shape} model in {time.time() - t:.1f} s", flush=True)


def synthetic_rows(n_rows: int, seq: int, vocab: int, seed: int, one_doc: bool = False) -> list[dict]:
    """Packed rows of exactly ``seq`` tokens in the tokenize stage's format (see qloraflow/tokenize.py).

    ``one_doc``: every row is a single example (plain causal attention, like the reference scripts'
    rows) instead of several packed ones (block-diagonal attention).
    """
    rng = random.Random(seed)
    lo = seq if one_doc else max(16, min(256, seq // 8))
    hi = seq if one_doc else max(lo, min(3072, seq // 2))
    first = max(4, vocab - SUB_VOCAB - 8)  # clear of the tokenizer's special ids
    rows = []
    for _ in range(n_rows):
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        while len(ids) < seq:
            n = rng.randint(lo, hi)
            if seq - len(ids) - n < lo:
                n = seq - len(ids)  # the last example fills the row exactly
            prompt = n // 4
            motif = [first + rng.randrange(SUB_VOCAB) for _ in range(rng.randint(4, 16))]
            doc = [first + rng.randrange(SUB_VOCAB) for _ in range(prompt)]
            doc += [motif[i % len(motif)] for i in range(n - prompt)]
            ids += doc
            labels += [-100] * prompt + doc[prompt:]
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "length": seq})
    return rows


def prepare(args: argparse.Namespace) -> None:
    """Write the model (once) and the tokenized dataset folder that train_adapter reads."""
    import datasets
    from transformers import AutoTokenizer

    model_dir, data_dir = Path(args.model_dir), Path(args.work) / "data"
    if not (model_dir / "config.json").exists() or not (model_dir / "tokenizer.json").exists():
        make_model(args.shape, model_dir)
    n_rows = args.steps * args.micro_batch * args.grad_accum
    rows = synthetic_rows(n_rows, args.seq, SHAPES[args.shape]["vocab_size"], seed=0,
                          one_doc=args.one_doc)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(data_dir / "train"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(data_dir / "tokenizer")
    print(f"wrote {n_rows} rows of {args.seq} tokens, {sum(r['position_ids'].count(0) for r in rows)} examples",
          flush=True)


# ----------------------------------------------------------------------------------------- tracking

class StepRecorder:
    """A ``Tracker`` that keeps every logged metric with the wall time it arrived at."""

    run_id: Optional[str] = None

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if step is not None and "loss" in metrics:
            self.steps.append({"step": step, "t": time.perf_counter(), **metrics})
            # One line a step, so that a run stopped by a time limit still says how far it got.
            print(f"STEP {step} loss {metrics['loss']:.4f} tokens/s {metrics.get('tokens_per_s', 0):.0f} "
                  f"reserved {metrics.get('gpu_peak_reserved_gib', 0):.2f} GiB", flush=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Any, artifact_path: Optional[str] = None) -> None:
        pass

    def log_dict(self, data: Any, artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def flops_per_token(shape: dict, seq: int) -> float:
    """Forward + input-gradient + recomputed forward, about 3x the forward (the baseline's count)."""
    L, d, f, v = shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    matmul = 2 * (L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v)
    attn = 2 * 2 * seq * d * L / 2  # causal QK^T and PV over a full row
    return 3 * (matmul + attn)


# ------------------------------------------------------------------------------------- experiments

def apply_experiments(args: argparse.Namespace, cfg: Any) -> None:
    """Patch the project's functions for the comparison runs (never used by the pipeline)."""
    from qloraflow import train as T

    if args.attn:
        cfg.model.attn_implementation = args.attn  # set after validation: flex is not a config choice
    cfg.model.upcast_unquantized_fp32 = args.fp32_upcast  # peft's prepare_model_for_kbit_training
    if args.activation_offloading:
        cfg.train.activation_offloading = True  # train.activation_offloading, set after validation as above
    off = set(args.off)
    if "host-token-count" in off:  # the Trainer's own count: a GPU sum and .item() each micro-step
        T.with_host_token_count = lambda cls: cls
    if "host-boundaries" in off:  # the attention reads the example boundaries off position_ids on the GPU
        T.boundaries_for = lambda cfg: None
    if "unsloth-flash-varlen" in off:  # Unsloth's own choice of kernel for packed rows
        from qloraflow import unsloth_backend

        unsloth_backend.use_flash_varlen_for_packed_rows = lambda: False


class StepTimer:
    """Wall time of steps ``warmup+1 .. steps``, the GPU synchronised at both ends (a TrainerCallback)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = None

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                if state.global_step in (timer.warmup, timer.steps) and torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == timer.warmup:
                    timer.t0 = time.perf_counter()
                elif state.global_step == timer.steps:
                    timer.t1 = time.perf_counter()

        return Timer()


# ----------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend == "unsloth":
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()  # before transformers, for its patches
    import torch

    from qloraflow.config import load_config
    from qloraflow.train import train_adapter

    work = Path(args.work)
    shutil.rmtree(work / f"out-{args.backend}", ignore_errors=True)  # train_adapter would resume from it
    overrides = {
        "model.base_model": str(args.model_dir), "train.backend": args.backend, "train.max_steps": args.steps,
        "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": args.grad_accum,
        "tokenize.sequence_len": args.seq, "train.logging_steps": args.logging_steps, "train.eval_steps": 0,
        "train.save_steps": 10**9, "train.use_cpu": not torch.cuda.is_available(),
    }
    import yaml

    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    cfg = load_config(args.config, overrides)
    apply_experiments(args, cfg)
    if torch.cuda.is_available():
        import gc

        gc.collect()  # a previous run in this process (benchmarks/train_speed.py) leaves cached blocks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rec = StepRecorder()
    timer = StepTimer(args.warmup, args.steps)
    from qloraflow import train as T

    build = T.build_trainer
    T.build_trainer = lambda *a, **kw: build(*a[:-1], a[-1] + [timer.callback()], **kw)
    try:
        summary = train_adapter(cfg, work / "data", work / f"out-{args.backend}", tracker=rec)
    finally:
        T.build_trainer = build

    steps = rec.steps
    tokens_per_step = args.seq * args.micro_batch * args.grad_accum
    steady = None
    if timer.t0 is not None and timer.t1 is not None:
        steady = tokens_per_step * (args.steps - args.warmup) / (timer.t1 - timer.t0)
    # The reference scripts report the median of individually synchronised steps; logging every step
    # synchronises each step here too, so the median of the logged steps' intervals is the same statistic.
    intervals = sorted((b["t"] - a["t"]) / (b["step"] - a["step"]) for a, b in zip(steps, steps[1:])
                       if a["step"] >= args.warmup)
    median_s = intervals[len(intervals) // 2] if intervals else None
    gpu = torch.cuda.is_available()
    result = {
        "backend": summary["backend"], "shape": args.shape, "seq": args.seq, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "steps": summary["global_step"], "warmup_excluded": args.warmup,
        "attn": cfg.model.attn_implementation, "fp32_upcast": args.fp32_upcast, "set": args.set,
        "activation_offloading": args.activation_offloading, "off": sorted(args.off),
        "logging_steps": cfg.train.logging_steps,
        "tokens_per_s": round(steady) if steady else None,
        "mfu": round(steady * flops_per_token(SHAPES[args.shape], args.seq) / PEAK_FLOPS, 3) if steady and gpu else None,
        "step_s": round(tokens_per_step / steady, 3) if steady else None,
        "tokens_per_s_median": round(tokens_per_step / median_s) if median_s else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "fits_24gb": (torch.cuda.max_memory_reserved() <= 24e9) if gpu else None,
        "loss_first": steps[0]["loss"] if steps else None, "loss_last": steps[-1]["loss"] if steps else None,
        "checkpointing": summary.get("checkpointing"), "train_seconds": summary["train_seconds"], "trainable_params": summary["trainable_params"],
        "gpu": torch.cuda.get_device_name(0) if gpu else "cpu", "versions": versions(),
        "per_step": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                      if k in ("step", "loss", "grad_norm", "tokens_per_s", "gpu_peak_reserved_gib")} for s in steps],
        # wall ms between consecutive logged steps (a GPU sync each when logging every step)
        "step_ms": [round((b["t"] - a["t"]) * 1e3 / (b["step"] - a["step"]), 1) for a, b in zip(steps, steps[1:])],
    }
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "unsloth", "unsloth_zoo"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("hf", "unsloth"), default="hf")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s (compilation, allocator)")
    ap.add_argument("--model-dir", default=None, help="random model folder; default /tmp/rand-SHAPE")
    ap.add_argument("--work", default="/tmp/qf-bench-train")
    ap.add_argument("--json", default=None)
    ap.add_argument("--attn", choices=("sdpa", "flex_attention", "varlen"), default=None)
    ap.add_argument("--fp32-upcast", action="store_true")
    ap.add_argument("--activation-offloading", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override after the benchmark's own, e.g. lora.dropout=0")
    ap.add_argument("--off", action="append", default=[], choices=sorted(OFF_SWITCHES),
                    help="turn one of the project's speed measures off (for the on/off table)")
    ap.add_argument("--logging-steps", type=int, default=1, help="1: every step's loss (a GPU sync a step)")
    ap.add_argument("--one-doc", action="store_true", help="one example per row (the reference scripts' rows)")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    return ap


def run_args(**changes: Any) -> argparse.Namespace:
    """This script's arguments at their defaults, with ``changes``: how the other benchmark scripts call
    :func:`prepare` and :func:`run` (``run_args(backend="unsloth", seq=2048, set=["lora.dropout=0"])``)."""
    args = parser().parse_args([])
    unknown = set(changes) - set(vars(args))
    if unknown:
        raise TypeError(f"not arguments of benchmarks/train.py: {sorted(unknown)}")
    vars(args).update(changes)
    args.model_dir = args.model_dir or f"/tmp/rand-{args.shape}"
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    args.model_dir = args.model_dir or f"/tmp/rand-{args.shape}"
    if args.prepare_only:
        prepare(args)
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--prepare-only", *(argv if argv is not None else sys.argv[1:])]
    subprocess.run(cmd, check=True)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k not in ("per_step", "versions")}
    print("RESULT " + json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()
