"""Preemption: SIGTERM during real training saves the step in progress as a complete checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from qloraflow import checkpoint as ckpt
from qloraflow import train as T
from qloraflow.errors import PreemptedError
from qloraflow.preemption import PreemptionGuard

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_saves_the_step_in_progress_and_the_rerun_resumes_from_it(tmp_path, tiny_model_dir, tiny_tokenized):
    # No periodic checkpoint before the end: a checkpoint that exists afterwards is the preemption's.
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 12, "train.save_steps": 1000})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qloraflow.train", "--config", str(cfg_path), "--data",
                             str(tiny_tokenized), "--out", str(out)], cwd=ROOT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    logged, lines = 0, []
    for line in proc.stdout:  # the Trainer logs every step (logging_steps 1): one 'loss' line each
        lines.append(line)
        logged += "'loss'" in line
        if logged == 3:
            proc.send_signal(signal.SIGTERM)  # what Kubernetes sends before SIGKILL
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert logged == 3, log[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]

    at_signal = int(re.search(r"SIGTERM after step (\d+)", log).group(1))
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert len(saved) == 1, saved
    step = int(saved[0].split("-")[1])
    assert step in (at_signal, at_signal + 1)  # the step at SIGTERM, or the one then in progress
    assert step >= 3 and step < cfg.train.max_steps  # no finished step lost; training did stop early
    folder = out / "checkpoints" / saved[0]
    assert ckpt.verify(folder) is None  # complete: every file matches the manifest written last
    for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert (folder / name).is_file(), name
    assert yaml.safe_load((folder / "trainer_state.json").read_text())["global_step"] == step
    assert f"checkpoint-{step} is complete" in log
    assert f"training was preempted (SIGTERM after step {at_signal}); checkpoint-{step} was saved" in log
    assert not (out / "adapter").exists()  # unfinished training publishes no adapter

    summary = T.train_adapter(cfg, tiny_tokenized, out)  # the retry: same output folder
    assert summary["resumed_from"] == str(folder)
    assert summary["global_step"] == cfg.train.max_steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_guard_turns_sigterm_into_a_retryable_error_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(grace_s=30) as guard:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: this process keeps running
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(PreemptedError, match="no step finished after it.*run it again with the same output"):
        guard.raise_if_preempted(tmp_path)
    PreemptionGuard(grace_s=30).raise_if_preempted(tmp_path)  # no SIGTERM, no error
