"""Every stage of the pipeline at the Llama-3-8B shape on one GPU, under a memory cap: wall time, peak
GPU memory, peak host RSS and generation tokens/s per stage.

    python benchmarks/pipeline_scale.py                                  # 8B shape, 24 GiB cap, the issue's sizes
    python benchmarks/pipeline_scale.py --controls                       # + the merge check's negative controls
    python benchmarks/pipeline_scale.py --shape tiny --records 200 --test-records 16 --seq 256 --steps 4 \\
        --eval-samples 16 --max-new-tokens 16                            # a smoke run, CPU or GPU

It runs the library's own stage functions with ``configs/llama3-8b-qlora-a10g.yaml`` (the settings
the 8B task uses; ``--set KEY=VALUE`` changes any), each stage in a child process of its own as a
Flyte task would run in its own container, so that each stage's peaks are its own:

- data: ``--records`` alpaca-like training records and ``--test-records`` test records
  (``make_alpaca_like.py`` from the reference scripts, ``--alpaca-like``), cleaned and deduplicated;
- tokenize at ``--seq`` tokens with packing;
- train ``--steps`` optimiser steps (micro-batch 2 x 1 at 8192: every step 16,384 tokens);
- evaluate base and candidate: held-out loss and ``--eval-samples`` greedy answers of up to
  ``--max-new-tokens`` tokens each (a random model rarely stops early: every answer is full length);
- merge and verify (``qloraflow.merge.merge_and_verify``), then evaluate the merged model;
- with ``--controls``: the merge check's negative controls at this size (the adapter scaled by 1.5
  before merging, one layer's delta left out, the merged model checked against another base of the
  same shape), each by the exact weight check, which must find every one of them.

The model has random weights (vocab 128256, hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads)
and a small BPE tokenizer trained on the records' words. ``--gpu-memory-gb 24`` caps each child's
GPU memory with ``torch.cuda.set_per_process_memory_fraction``, standing in for a 24 GB card: an
allocation past it fails as on the card. Each child writes ``stage-NAME.json`` under ``--work``; the
last line printed is ``RESULT {json}`` with every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "llama3-8b-qlora-a10g.yaml"
ALPACA_LIKE = ROOT.parent / "shared" / "bench" / "make_alpaca_like.py"
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0),
}
STAGES = ["data", "tokenize", "train", "evaluate", "merge", "evaluate_merged"]


# --------------------------------------------------------------------------------------------- setup

def make_model(shape: str, path: Path, records: Path, seed: int) -> None:
    """A random-weight Llama of ``shape`` (bf16) with a BPE tokenizer learnt from the records' words."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qloraflow.demo import build_tokenizer

    texts = [" ".join(json.loads(line).values()) for line in records.read_text().splitlines()[:500]]
    tokenizer = build_tokenizer(texts, 1024)
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def config(args: argparse.Namespace) -> Any:
    import torch
    import yaml

    from qloraflow.config import load_config

    w = Path(args.work)
    overrides = {
        "model.base_model": str(w / "base"), "data.train_files": [str(w / "train.jsonl")],
        "data.test_files": [str(w / "test.jsonl")], "tokenize.sequence_len": args.seq,
        "tokenize.num_proc": min(8, os.cpu_count() or 1), "train.backend": args.backend,
        "train.max_steps": args.steps, "train.gradient_accumulation_steps": 1, "train.eval_steps": 0,
        "train.save_steps": 10**9, "train.use_cpu": not torch.cuda.is_available(),
        "eval.max_samples": args.eval_samples, "eval.max_new_tokens": args.max_new_tokens,
    }
    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    return load_config(args.config, overrides)


# --------------------------------------------------------------------------------------------- stages

def stage_data(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.data import prepare_dataset

    report = prepare_dataset(cfg.data, Path(args.work) / "data", seed=cfg.seed)
    return {"read": report.get("read"), "kept": report.get("kept"), "rejected": report.get("rejected")}


def stage_tokenize(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.tokenize import tokenize_dataset

    report = tokenize_dataset(cfg.tokenize, Path(args.work) / "data", cfg.model.base_model, Path(args.work) / "tok")
    return {split: {k: v[k] for k in ("rows", "tokens", "trained_tokens", "packing_efficiency")}
            for split, v in report["splits"].items()}


def stage_train(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.train import train_adapter

    shutil.rmtree(Path(args.work) / "train", ignore_errors=True)  # it would resume
    s = train_adapter(cfg, Path(args.work) / "tok", Path(args.work) / "train")
    return {k: s.get(k) for k in ("backend", "global_step", "train_loss_first", "train_loss_last", "train_seconds",
                                  "tokens_per_s")}


def _eval_row(e: Any) -> dict:
    return {"generated_tokens": e.generated_tokens, "generation_s": round(e.generation_seconds, 1),
            "generation_tokens_per_s": round(e.tokens_per_s), "answers": len(e.samples),
            **{k: round(v, 4) for k, v in e.metrics.items()}}


def stage_evaluate(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.evaluate import evaluate_base_and_candidate

    w = Path(args.work)
    return {name: _eval_row(e) for name, e in
            evaluate_base_and_candidate(cfg, w / "data", w / "tok", w / "train" / "adapter").items()}


def stage_merge(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.merge import merge_and_verify, probe_rows

    w = Path(args.work)
    shutil.rmtree(w / "merged", ignore_errors=True)
    info = merge_and_verify(cfg.model.base_model, w / "train" / "adapter", w / "merged", cfg.model.compute_dtype,
                            probe_rows(w / "tok", cfg.merge.probe_samples), cfg.merge.kl_factor)
    v = info["verify"]
    return {"merge_s": info["merge_seconds"], "verify_s": info["verify_seconds"], "merged_gib": info["bytes"] / 2**30,
            "worst_ulps": v["weights"]["worst_ulps"], "adapted_tensors": v["weights"]["adapted"],
            "delta_lost_share": round(v["weights"]["delta_lost_share"], 4), "outputs": v["outputs"],
            "rounding": v["rounding"], "kl_bound": v["kl_bound"]}


def stage_evaluate_merged(args: argparse.Namespace, cfg: Any) -> dict:
    from qloraflow.evaluate import evaluate_model

    w = Path(args.work)
    return {"merged": _eval_row(evaluate_model(cfg, str(w / "merged"), w / "data", w / "tok"))}


def stage_controls(args: argparse.Namespace, cfg: Any) -> dict:
    """The three faults the merge check must find, at this size (weights checked exactly, streamed)."""
    from safetensors.torch import load_file, save_file

    from qloraflow.merge import check_merged_weights, merge_adapter, weight_problems
    from qloraflow.precision import DTYPES

    w, dtype = Path(args.work), DTYPES[cfg.model.compute_dtype]
    adapter, base, merged = w / "train" / "adapter", cfg.model.base_model, w / "merged"
    out = {}

    def check(name: str, against_base: str, folder: Path) -> None:
        t = time.perf_counter()
        weights = check_merged_weights(against_base, adapter, folder, dtype)
        problems = weight_problems(weights)
        out[name] = {"caught": bool(problems), "problems": problems, "seconds": round(time.perf_counter() - t, 1),
                     "tensors_outside_bound": len(weights["outside_bound"]), "worst_ulps": weights["worst_ulps"],
                     "unadapted_changed": len(weights["unadapted_changed"])}
        print(f"CONTROL {name}: {'caught' if problems else 'MISSED'}: {problems}", flush=True)

    # 1. The honest merge checked against another base of the same shape (as if merged into the wrong one).
    other = w / "other-base"
    make_model_apart(args.shape, other, w / "train.jsonl", seed=1)
    check("another_base", str(other), merged)
    shutil.rmtree(other)
    # 2. One layer's delta left out: the honest merge with one adapted tensor put back to the base's.
    target = "model.layers.7.self_attn.v_proj.weight" if args.shape == "8b" else "model.layers.1.self_attn.v_proj.weight"
    partial = w / "merged-partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(merged, partial, copy_function=os.link)
    base_tensor = next(load_file(str(f))[target] for f in Path(base).glob("*.safetensors")
                       if target in json.loads(_header(f)))
    for shard in partial.glob("*.safetensors"):
        if target in json.loads(_header(shard)):
            tensors = load_file(str(shard))
            tensors[target] = base_tensor.to(dtype)
            shard.unlink()  # a hard link: write a new file, never into the honest merge's
            save_file(tensors, str(shard), metadata={"format": "pt"})
    check("one_layer_left_out", base, partial)
    shutil.rmtree(partial)
    # 3. The adapter scaled by 1.5 before merging.
    scaled = w / "adapter-scaled"
    shutil.rmtree(scaled, ignore_errors=True)
    shutil.copytree(adapter, scaled)
    state = load_file(str(scaled / "adapter_model.safetensors"))
    save_file({k: v * 1.5 if ".lora_B." in k else v for k, v in state.items()},
              str(scaled / "adapter_model.safetensors"), metadata={"format": "pt"})
    merge_adapter(base, scaled, w / "merged-scaled", cfg.model.compute_dtype)
    check("adapter_scaled_1.5", base, w / "merged-scaled")
    shutil.rmtree(w / "merged-scaled")
    return out


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


RUNNERS: dict[str, Callable[[argparse.Namespace, Any], dict]] = {
    "data": stage_data, "tokenize": stage_tokenize, "train": stage_train, "evaluate": stage_evaluate,
    "merge": stage_merge, "evaluate_merged": stage_evaluate_merged, "controls": stage_controls}


def run_stage(args: argparse.Namespace) -> None:
    """One stage in this (child) process, under the GPU cap; its numbers go to ``stage-NAME.json``."""
    if args.backend == "unsloth" and args.stage == "train":
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()  # before transformers, for its patches
    import torch

    gpu = torch.cuda.is_available()
    if gpu and args.gpu_memory_gb:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.gpu_memory_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    cfg = config(args)
    started = time.perf_counter()
    result = RUNNERS[args.stage](args, cfg)
    row = {"stage": args.stage, "wall_s": round(time.perf_counter() - started, 1),
           "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None,
           "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
           "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "result": result}
    (Path(args.work) / f"stage-{args.stage}.json").write_text(json.dumps(row, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ run

def prepare(args: argparse.Namespace) -> float:
    w = Path(args.work)
    w.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for name, n, seed in (("train.jsonl", args.records, 0), ("test.jsonl", args.test_records, 1)):
        subprocess.run([sys.executable, str(args.alpaca_like), str(n), str(w / name), str(seed)], check=True)
    if not (w / "base" / "config.json").exists():
        make_model_apart(args.shape, w / "base", w / "train.jsonl", seed=0)
    return time.perf_counter() - t


def make_model_apart(shape: str, path: Path, records: Path, seed: int) -> None:
    """:func:`make_model` in a child process with no memory cap: the random weights are drawn in fp32
    on the GPU (32 GB at 8B), which is neither a stage's peak nor within a 24 GB card."""
    code = ("import sys; sys.path.insert(0, %r); from pathlib import Path; import pipeline_scale as p; "
            "p.make_model(%r, Path(%r), Path(%r), %d)" % (str(Path(__file__).parent), shape, str(path),
                                                         str(records), seed))
    subprocess.run([sys.executable, "-c", code], check=True)


def table(rows: list[dict]) -> str:
    lines = ["| stage | wall | peak GPU reserved | peak host RSS | notes |", "|---|---|---|---|---|"]
    for r in rows:
        res, notes = r["result"], ""
        if r["stage"] in ("evaluate", "evaluate_merged"):
            notes = "; ".join(f"{m}: {v['answers']} answers, {v['generated_tokens']} tokens in {v['generation_s']} s, "
                              f"{v['generation_tokens_per_s']} tok/s, held-out loss {v['heldout_loss']:.3f}"
                              for m, v in res.items())
        elif r["stage"] == "merge":
            notes = (f"merge {res['merge_s']} s + verify {res['verify_s']} s; weights within {res['worst_ulps']:.2f} ulp; "
                     f"KL {res['outputs']['mean_kl']:.2e} <= {res['kl_bound']:.2e}; greedy agreement "
                     f"{res['outputs']['greedy_agreement']:.2%}")
        elif r["stage"] == "train":
            notes = (f"{res['global_step']} steps, loss {res['train_loss_first']:.3f} -> {res['train_loss_last']:.3f}, "
                     f"{res['backend']}")
        elif r["stage"] == "tokenize":
            notes = "; ".join(f"{s}: {v['rows']} rows, {v['tokens']} tokens" for s, v in res.items())
        elif r["stage"] == "data":
            notes = f"read {res['read']}, kept {res['kept']}"
        elif r["stage"] == "controls":
            notes = "; ".join(f"{k}: {'caught' if v['caught'] else 'MISSED'}" for k, v in res.items())
        gpu = f"{r['peak_gpu_reserved_gib']:.1f} GiB" if r["peak_gpu_reserved_gib"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['wall_s']:.0f} s | {gpu} | {r['peak_host_rss_gib']:.1f} GiB | {notes} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--test-records", type=int, default=500)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--backend", choices=("hf", "unsloth", "auto"), default="hf")
    ap.add_argument("--gpu-memory-gb", type=float, default=24.0, help="cap per stage process (0: none)")
    ap.add_argument("--controls", action="store_true", help="also the merge check's negative controls")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    ap.add_argument("--alpaca-like", default=str(ALPACA_LIKE), help="the reference make_alpaca_like.py")
    ap.add_argument("--work", default="/tmp/qf-pipeline-scale")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--write-config", default=None, metavar="YAML",
                    help="prepare the records and model, write the config the stages use, and stop "
                         "(for `pyflyte run workflows/finetune.py finetune --config YAML`)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.stage:
        run_stage(args)
        return
    setup_s = prepare(args)
    print(f"records and random {args.shape} model ready in {setup_s:.0f} s", flush=True)
    if args.write_config:
        from qloraflow.config import config_to_yaml

        Path(args.write_config).write_text(config_to_yaml(config(args)))
        print(f"wrote {args.write_config}", flush=True)
        return
    rows = []
    for stage in args.stages.split(",") + (["controls"] if args.controls else []):
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--stage", stage], check=True)
        row = json.loads((Path(args.work) / f"stage-{stage}.json").read_text())
        row["process_s"] = round(time.perf_counter() - t, 1)  # with the child's imports
        rows.append(row)
        print(f"STAGE {json.dumps(row, default=str)}", flush=True)
    print(table(rows), flush=True)
    result = {"shape": args.shape, "gpu_memory_gb": args.gpu_memory_gb, "setup_s": round(setup_s, 1), "stages": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
