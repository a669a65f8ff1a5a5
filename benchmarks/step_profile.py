"""Where one training step's time goes: the project's training loop against Unsloth's bare loop.

    python benchmarks/step_profile.py [--systems peer,unsloth] [--seq 2048] [--micro-batch 2] [--one-doc]
                                      [--set lora.dropout=0] [--steps 8] [--profile-steps 3]

Each system runs in its own process on the random Llama-3-8B shape (/tmp/rand-8b, see benchmarks/train.py):

  peer      Unsloth's own loop (the loop of /work/shared/bench/unsloth_peer.py): forward with labels,
            backward, PagedAdamW8bit step, on (micro-batch, seq) rows of random ids
  unsloth   the project's ``train_adapter`` with backend ``unsloth`` (benchmarks/train.py's data and config)
  hf        the same with backend ``hf``

A torch profiler records ``--profile-steps`` steps after the warm-up, with the GPU synchronised at both
ends. Printed per system: wall time a step, GPU busy time a step (the union of kernels and copies),
GPU idle time a step, the CPU operations running while the GPU idled (the time they overlap the idle
gaps, summed), and the kernels by total time. The two systems' kernel tables side by side show what
GPU work one does that the other does not; the idle time shows what the loop around them costs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import train as bench  # benchmarks/train.py (a script's own folder is first on sys.path)

ROOT = bench.ROOT


class Window:
    """Profiles steps ``first`` .. ``first + n - 1`` (1-based), the GPU synchronised at both ends."""

    def __init__(self, first: int, n: int, trace: Path) -> None:
        self.first, self.n, self.trace = first, n, trace
        self.prof: Any = None
        self.wall = 0.0

    def begin(self, step: int) -> None:
        import torch

        if step == self.first:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        import torch

        if step == self.first + self.n - 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.prof.export_chrome_trace(str(self.trace))
            self.prof = None


def profile_project(a: argparse.Namespace, trace: Path) -> float:
    """The project's train_adapter with a profiler window; returns the window's wall seconds."""
    if a.system == "unsloth":
        from qloraflow.unsloth_backend import import_unsloth

        import_unsloth()
    from transformers import TrainerCallback

    from qloraflow import train as T

    window = Window(a.warmup + 1, a.profile_steps, trace)

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            window.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            window.end(state.global_step)

    build = T.build_trainer
    T.build_trainer = lambda *args, **kw: build(*args[:-1], args[-1] + [Profile()], **kw)
    ns = bench.run_args(backend=a.system, shape="8b", seq=a.seq, micro_batch=a.micro_batch, steps=a.steps,
                        warmup=a.warmup, model_dir=a.model_dir, work=a.work, one_doc=a.one_doc, set=a.set, off=a.off)
    bench.prepare(ns)
    bench.run(ns)
    return window.wall


def profile_peer(a: argparse.Namespace, trace: Path) -> float:
    """Unsloth's bare loop (as unsloth_peer.py) with the same profiler window."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    from unsloth import FastLanguageModel  # noqa: I001 - before torch users, as the peer script
    import bitsandbytes as bnb
    import torch

    model, _ = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=a.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=3407)
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    window = Window(a.warmup + 1, a.profile_steps, trace)
    for step in range(1, a.warmup + a.profile_steps + 1):
        x = torch.randint(0, 128256, (a.micro_batch, a.seq), device="cuda")
        window.begin(step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.end(step)
    return window.wall


# -------------------------------------------------------------------------------------------- analysis

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def analyse(trace: Path, wall: float, steps: int) -> dict[str, Any]:
    """Busy/idle GPU time a step, CPU ops overlapping the idle gaps, kernel totals (all in ms a step)."""
    events = json.loads(trace.read_text())["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X")
    busy, gaps, end = 0.0, [], None
    for start, stop, _ in gpu:
        if end is None or start > end:
            if end is not None:
                gaps.append((end, start))
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    kernels: dict[str, float] = collections.Counter()
    for start, stop, name in gpu:
        kernels[name[:90]] += (stop - start) / 1e3 / steps
    # CPU operations (outermost only, per thread) that overlap the GPU's idle gaps
    cpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"], e.get("tid")) for e in events
                 if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime") and e.get("ph") == "X")
    outer, last_end = [], {}
    for start, stop, name, tid in cpu:
        if start >= last_end.get(tid, -1):
            outer.append((start, stop, name))
            last_end[tid] = stop
    idle_ops: dict[str, float] = collections.Counter()
    gi = 0
    for start, stop, name in outer:
        while gi < len(gaps) and gaps[gi][1] <= start:
            gi += 1
        j = gi
        while j < len(gaps) and gaps[j][0] < stop:
            idle_ops[name[:70]] += (min(stop, gaps[j][1]) - max(start, gaps[j][0])) / 1e3 / steps
            j += 1
    wall_ms = wall * 1e3 / steps
    return {"wall_ms": round(wall_ms, 1), "gpu_busy_ms": round(busy / 1e3 / steps, 1),
            "gpu_idle_ms": round(wall_ms - busy / 1e3 / steps, 1),
            "idle_gaps_over_1ms": sum(1 for s, e in gaps if e - s > 1000) / steps,
            "idle_cpu_ops_ms": [(k, round(v, 2)) for k, v in sorted(idle_ops.items(), key=lambda kv: -kv[1])[:15]],
            "kernels_ms": [(k, round(v, 2)) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]]}


def report(results: dict[str, dict]) -> str:
    lines = []
    for system, r in results.items():
        lines.append(f"== {system}: {r['wall_ms']} ms a step wall, GPU busy {r['gpu_busy_ms']} ms, "
                     f"idle {r['gpu_idle_ms']} ms ({r['idle_gaps_over_1ms']:.1f} gaps > 1 ms a step)")
        lines.append("   CPU ops while the GPU idled (ms a step):")
        lines += [f"     {v:8.2f}  {k}" for k, v in r["idle_cpu_ops_ms"]]
        lines.append("   kernels (ms a step):")
        lines += [f"     {v:8.2f}  {k}" for k, v in r["kernels_ms"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="peer,unsloth")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--one-doc", action="store_true", help="project rows of one example each (the peer's rows)")
    ap.add_argument("--steps", type=int, default=8, help="project systems: training steps in all")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--off", action="append", default=[], help="benchmarks/train.py's --off switches")
    ap.add_argument("--model-dir", default="/tmp/rand-8b")
    ap.add_argument("--work", default="/tmp/qf-step-profile")
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    if a.system:  # child: one system
        trace = work / f"trace-{a.system}.json"
        wall = profile_peer(a, trace) if a.system == "peer" else profile_project(a, trace)
        (work / f"wall-{a.system}.json").write_text(json.dumps({"wall": wall}))
        return

    subprocess.run([sys.executable, bench.__file__, "--prepare-only", "--seq", "128", "--steps", "1",
                    "--micro-batch", "1", "--model-dir", a.model_dir, "--work", str(work)], check=True)
    results = {}
    for system in a.systems.split(","):
        child = [sys.executable, os.path.abspath(__file__), "--system", system, "--seq", str(a.seq),
                 "--micro-batch", str(a.micro_batch), "--steps", str(max(a.steps, a.warmup + a.profile_steps)),
                 "--warmup", str(a.warmup), "--profile-steps", str(a.profile_steps), "--model-dir", a.model_dir,
                 "--work", str(work), *(["--one-doc"] if a.one_doc else []), *[f"--set={kv}" for kv in a.set],
                 *[f"--off={x}" for x in a.off]]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
        if subprocess.run(child, env=env).returncode != 0:
            print(f"{system}: failed", flush=True)
            continue
        wall = json.loads((work / f"wall-{system}.json").read_text())["wall"]
        results[system] = analyse(work / f"trace-{system}.json", wall, a.profile_steps)
        print(report({system: results[system]}), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "step_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
