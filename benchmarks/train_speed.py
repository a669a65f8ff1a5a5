"""Training speed of the project's backends against the plain HF stack and Unsloth's own recipe.

    python benchmarks/train_speed.py [--systems baseline,peer,hf,unsloth] [--configs 2048x2,8192x1,8192x2]
                                     [--steps 10] [--json speed.json]
    python benchmarks/train_speed.py --merge part1.json part2.json      # one table from several runs

Systems, each run in its own process over every config (SEQxMICROBATCH), on the same random
Llama-3-8B-shaped model (/tmp/rand-8b, written first by benchmarks/train.py):

  baseline   the reference plain stack, /work/shared/bench/hf_qlora_baseline.py (transformers + peft +
             bitsandbytes NF4, SDPA, checkpointing, paged AdamW 8-bit, r=16 all-linear, unpacked rows)
  peer       Unsloth's own recipe, /work/shared/bench/unsloth_peer.py
  hf         the project's ``train_adapter``, backend ``hf`` (benchmarks/train.py: packed rows,
             llama3-8b-qlora-a10g.yaml settings, LoRA dropout 0.05, no accumulation)
  unsloth    the same with backend ``unsloth``
  hf-varlen  ``hf`` with PyTorch's varlen flash attention over the packed documents (an experiment,
             see benchmarks/train.py --attn varlen)
  *-1doc     the same with one example per row (plain causal attention, as the references' rows)

A project system may carry changes after colons, for the table of each measure's contribution:
``unsloth:off=host-token-count`` turns one of benchmarks/train.py's ``--off`` switches off,
``hf:lora.dropout=0.05`` overrides one config key (after the run's ``--set``), ``hf:attn=varlen``
picks the attention. Each such system is its own row. The table of each measure's contribution
at 2048 x 2, in two runs that each fit the GPU machines' 10-minute command limit:

    python benchmarks/train_speed.py --configs 2048x2 --systems baseline,hf,hf:attn=varlen,\
        hf:train.liger_kernel=true,hf:train.activation_offloading=true,hf:lora.dropout=0
    python benchmarks/train_speed.py --configs 2048x2 --set lora.dropout=0 --systems peer,unsloth,\
        unsloth:off=unsloth-flash-varlen,unsloth:off=host-token-count,unsloth:off=host-boundaries

Only the checkout reaches a GPU machine, so the two reference scripts are read from copies in the
git-ignored ``.gpu/`` folder (``--reference-dir``). The references time the median of 8 steps after 3
warm-up steps; the project's systems time steps ``--warmup``+1 to ``--steps``. MFU counts 6N FLOPs a
token plus causal attention over the full row (the baseline's formula) against 790 TFLOP/s.
One run of everything takes longer than the GPU machines' 10-minute command limit on one GPU.
``--gpus N`` spreads the configs over N GPUs of the machine (the costliest first, each to the GPU
with the least work so far); each config's systems still run one after another on one GPU, so every
ratio compares numbers from the same GPU. Or run subsets with ``--systems`` and print the joint
table with ``--merge``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import train as bench  # benchmarks/train.py (a script's own folder is first on sys.path)

ROOT = bench.ROOT
# system -> (backend, attention experiment, one example per row)
PROJECT = {"hf": ("hf", None, False), "unsloth": ("unsloth", None, False), "hf-varlen": ("hf", "varlen", False),
           "unsloth-1doc": ("unsloth", None, True), "hf-1doc": ("hf", None, True)}
REFERENCES = {"baseline": "hf_qlora_baseline.py", "peer": "unsloth_peer.py"}
MODEL_DIR = "/tmp/rand-8b"  # where the reference scripts read the model


def parse_config(text: str) -> tuple[int, int]:
    seq, mb = text.lower().split("x")
    return int(seq), int(mb)


# ------------------------------------------------------------------------------------- child process

def parse_system(spec: str) -> tuple[str, Optional[str], bool, list[str], list[str]]:
    """``name[:change...]`` -> (backend, attention, one example per row, --off switches, --set overrides).

    ``cap=24`` stands in for a 24 GB card (24e9 bytes): the process's CUDA memory fraction is capped
    there (see :func:`cap_memory`) and ``train.gpu_memory_gb`` set to it.
    """
    name, *changes = spec.split(":")
    backend, attn, one_doc = PROJECT[name]
    off, sets = [], []
    for change in changes:
        key, _, value = change.partition("=")
        if key == "off":
            off.append(value)
        elif key == "attn":
            attn = value
        elif key == "cap":
            sets.append(f"train.gpu_memory_gb={float(value) * 1e9 / 2**30:.3f}")
        else:
            sets.append(change)
    return backend, attn, one_doc, off, sets


def cap_memory(system: str) -> Optional[float]:
    """Cap this process's CUDA memory at the system's ``cap=GB`` (decimal GB, as cards are sold); the cap."""
    caps = [float(c.partition("=")[2]) for c in system.split(":")[1:] if c.startswith("cap=")]
    if not caps:
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, caps[-1] * 1e9 / total))
    return caps[-1]


def run_project(system: str, configs: list[str], a: argparse.Namespace) -> list[dict]:
    """All configs of one project system in this process (Unsloth imported first when needed).

    The rows go to ``a.json`` after each config, so a run stopped by its time limit keeps the others.
    """
    backend, attn, one_doc, off, sets = parse_system(system)
    if backend == "unsloth":
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()
    import torch

    cap_memory(system)
    rows = []
    for text in configs:
        seq, mb = parse_config(text)
        ns = bench.run_args(backend=backend, shape=a.shape, seq=seq, micro_batch=mb, steps=a.steps, warmup=a.warmup,
                            model_dir=a.model_dir, work=a.work, attn=attn, one_doc=one_doc, set=a.set + sets,
                            off=off, logging_steps=a.logging_steps)
        try:
            bench.prepare(ns)
            r = bench.run(ns)
            rows.append({"system": system, "seq": seq, "mb": mb, "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                         "step_s": r["step_s"], "tokens_per_s_median": r["tokens_per_s_median"], "peak_reserved_gib": r["peak_reserved_gib"],
                         "peak_allocated_gib": r["peak_allocated_gib"], "loss_first": r["loss_first"],
                         "loss_last": r["loss_last"], "attn": r["attn"], "step_ms": r["step_ms"],
                         "checkpointing": r.get("checkpointing")})
        except torch.cuda.OutOfMemoryError:
            rows.append({"system": system, "seq": seq, "mb": mb, "oom": True})
        except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
            rows.append({"system": system, "seq": seq, "mb": mb, "failed": f"{type(e).__name__}: {e}"[:500]})
        print("ROW " + json.dumps(rows[-1]), flush=True)
        Path(a.json).write_text(json.dumps(rows))
    return rows


def run_reference(system: str, configs: list[str], reference_dir: Path, timeout_s: float) -> list[dict]:
    """One reference script over all configs; its RESULT lines, and OOM where it printed one."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # the scripts would write files to $OUT
    env.update(SHAPE="8b", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    proc = subprocess.run([sys.executable, str(reference_dir / REFERENCES[system]), *configs], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            rows.append({"system": system, "seq": r["seq"], "mb": r["mb"], "oom": bool(r.get("oom")),
                         "tokens_per_s": r.get("tok_per_s_window", r.get("tok_per_s")),
                         "tokens_per_s_median": r.get("tok_per_s"), "step_s": r.get("step_s"),
                         "step_ms": r.get("step_ms"),
                         "peak_reserved_gib": r.get("peak_reserved_gib"), "peak_allocated_gib": r.get("peak_gib")})
        elif line.startswith("OOM "):
            seq, mb = parse_config(line.split()[1])
            rows.append({"system": system, "seq": seq, "mb": mb, "oom": True})
    if proc.returncode != 0 and not rows:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------- table

def add_mfu(rows: list[dict]) -> None:
    """The references' MFU by the same formula as the project's rows (the peer prints none)."""
    for r in rows:
        if r.get("tokens_per_s") and r.get("mfu") is None and r["system"] in REFERENCES:
            r["mfu"] = round(r["tokens_per_s"] * bench.flops_per_token(bench.SHAPES["8b"], r["seq"]) / bench.PEAK_FLOPS, 3)


def table(rows: list[dict]) -> str:
    """One line per (config, system): tokens/s, MFU, peak reserved, ratios to baseline and peer.

    ``tokens/s`` is the window (the mean over all timed steps, what a whole job sees; the references
    print it as ``tok_per_s_window``); ``median`` is the median step. ``x peer`` and ``x baseline``
    compare windows. ``max/med`` is the slowest timed step over the median step, ``ckpt`` the layers
    that recompute (of all) where the memory budget chose.
    """
    by = {(r["system"], r["seq"], r["mb"]): r for r in rows}
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = max([12] + [len(r["system"]) for r in rows])
    lines = [f"{'config':>8} {'system':>{width}} {'tokens/s':>9} {'median':>7} {'MFU':>6} {'reserved':>9} "
             f"{'<=24GB':>6} {'x baseline':>10} {'x peer':>7} {'max/med':>7} {'ckpt':>6}"]
    for seq, mb in sorted({(r["seq"], r["mb"]) for r in rows}):
        base = by.get(("baseline", seq, mb), {}).get("tokens_per_s")
        peer = by.get(("peer", seq, mb), {}).get("tokens_per_s")
        for system in systems:
            r = by.get((system, seq, mb))
            if r is None:
                continue
            if r.get("oom") or not r.get("tokens_per_s"):
                lines.append(f"{seq:>5}x{mb:<2} {system:>{width}} {'OOM' if r.get('oom') else 'failed':>9} "
                             f"{str(r.get('failed', ''))[:80]}")
                continue
            tps, med, res = r["tokens_per_s"], r.get("tokens_per_s_median") or r["tokens_per_s"], r.get("peak_reserved_gib")
            fits = "yes" if res is not None and res * 2**30 <= 24e9 else "no"
            steps_ms = sorted(r.get("step_ms") or [])
            spike = steps_ms[-1] / steps_ms[len(steps_ms) // 2] if steps_ms else float("nan")
            plan = r.get("checkpointing") or {}
            ckpt = f"{plan['checkpointed']}/{plan['layers']}" if plan.get("layers") else "-"
            lines.append(f"{seq:>5}x{mb:<2} {system:>{width}} {tps:>9,.0f} {med:>7,.0f} {r.get('mfu') or 0:>6.1%} "
                         f"{res or 0:>6.1f} GiB {fits:>6} {tps / base if base else float('nan'):>10.2f} "
                         f"{tps / peer if peer else float('nan'):>7.2f} {spike:>7.2f} {ckpt:>6}")
    return "\n".join(lines)


def split_configs(configs: list[str], gpus: int) -> list[list[str]]:
    """Configs per GPU: costliest (tokens a step) first, each to the GPU with the fewest tokens so far."""
    groups: list[list[str]] = [[] for _ in range(gpus)]
    load = [0] * gpus
    for text in sorted(configs, key=lambda c: -(parse_config(c)[0] * parse_config(c)[1])):
        i = load.index(min(load))
        groups[i].append(text)
        load[i] += parse_config(text)[0] * parse_config(text)[1]
    return [g for g in groups if g]


def run_on_gpus(a: argparse.Namespace, configs: list[str]) -> list[dict]:
    """This script once per GPU over its share of the configs, all at the same time; their rows."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(a.gpus)]
    if len(devices) < a.gpus:
        raise SystemExit(f"--gpus {a.gpus} but CUDA_VISIBLE_DEVICES={visible!r} names {len(devices)}")
    procs = []
    for gpu, group in enumerate(split_configs(configs, a.gpus)):
        work = Path(a.work) / f"gpu{gpu}"
        work.mkdir(parents=True, exist_ok=True)
        # Each GPU's rows are written after each system; next to --json, a time limit leaves them there.
        part = Path(a.json).with_suffix(f".gpu{gpu}.json") if a.json else work / "rows.json"
        part.unlink(missing_ok=True)
        # Own work folder and Unsloth compile cache per GPU: the processes write their files side by side.
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices[gpu], UNSLOTH_COMPILE_LOCATION=str(work / "unsloth_compiled_cache"))
        cmd = [sys.executable, os.path.abspath(__file__), "--systems", a.systems, "--configs", ",".join(group),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--reference-dir", a.reference_dir,
               "--work", str(work), "--timeout", str(a.timeout), "--json", str(part), "--shape", a.shape,
               "--model-dir", a.model_dir, "--logging-steps", str(a.logging_steps), *[f"--set={kv}" for kv in a.set]]
        print(f"GPU {gpu}: {','.join(group)}", flush=True)
        procs.append((part, subprocess.Popen(cmd, env=env)))
    rows = []
    for part, proc in procs:
        proc.wait()
        rows += json.loads(part.read_text())["rows"] if part.exists() else []
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="baseline,peer,hf,unsloth")
    ap.add_argument("--configs", default="2048x2,8192x1,8192x2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reference-dir", default=str(ROOT / ".gpu"))
    ap.add_argument("--work", default="/tmp/qf-bench-speed")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per system")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="*", default=None, help="print one table from these --json files")
    ap.add_argument("--shape", default="8b", help="model shape of the project's systems (tiny: a smoke run)")
    ap.add_argument("--model-dir", default=MODEL_DIR)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the project's systems, e.g. lora.dropout=0 (the peer's LoRA)")
    ap.add_argument("--logging-steps", type=int, default=1, help="the project's systems log (and sync) every N steps")
    ap.add_argument("--gpus", type=int, default=1, help="spread the configs over this many GPUs (see above)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    configs = a.configs.split(",")

    if a.child:
        run_project(a.child, configs, a)
        return
    if a.merge is not None:
        rows = [r for f in a.merge for r in json.loads(Path(f).read_text())["rows"]]
        print(table(rows))
        return

    # The random model (and a tokenizer for Unsloth) once, in its own process.
    subprocess.run([sys.executable, bench.__file__, "--prepare-only", "--seq", "128", "--steps", "1",
                    "--micro-batch", "1", "--shape", a.shape, "--model-dir", a.model_dir, "--work", a.work], check=True)
    if a.gpus > 1:
        rows = run_on_gpus(a, configs)
        if a.json:
            Path(a.json).write_text(json.dumps({"rows": rows, "steps": a.steps, "warmup": a.warmup}, indent=1))
        print(table(rows), flush=True)
        return
    rows: list[dict] = []
    for system in a.systems.split(","):
        t = time.time()
        try:
            if system in REFERENCES:
                got = run_reference(system, configs, Path(a.reference_dir), a.timeout)
            else:
                out = Path(a.work) / f"rows-{len(rows)}.json"
                out.unlink(missing_ok=True)
                subprocess.run([sys.executable, os.path.abspath(__file__), "--child", system, "--configs", a.configs,
                                "--steps", str(a.steps), "--warmup", str(a.warmup), "--work", a.work,
                                "--shape", a.shape, "--model-dir", a.model_dir, "--json", str(out),
                                "--logging-steps", str(a.logging_steps),
                                *[f"--set={kv}" for kv in a.set]], timeout=a.timeout)
                got = json.loads(out.read_text()) if out.exists() else []
        except subprocess.TimeoutExpired:
            got = []
        if not got:
            got = [{"system": system, "seq": s, "mb": m, "failed": True} for s, m in map(parse_config, configs)]
        rows += got
        add_mfu(rows)
        print(f"{system}: {time.time() - t:.0f} s", flush=True)
        if a.json:  # after each system: a run stopped by a time limit keeps what it measured
            Path(a.json).write_text(json.dumps({"rows": rows, "steps": a.steps, "warmup": a.warmup}, indent=1))
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
