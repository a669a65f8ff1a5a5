"""A full disk, provoked for real: a file-size limit (RLIMIT_FSIZE, set in the child before it starts)
makes every write past it fail with EFBIG, as a nearly full disk does. The stage must stop with a
``DiskFullError`` naming the file it could not write, and leave its output folder whole or absent.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, tiny_config


def _limited(limit_bytes: int):  # noqa: ANN202 - a preexec_fn
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def _run_limited(code: str, limit_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=_limited(limit_bytes))


DATA = """
import sys
from qloraflow.config import DataConfig
from qloraflow.data import prepare_dataset
from qloraflow.errors import DiskFullError
try:
    prepare_dataset(DataConfig(train_files=[sys.argv[1]], validation_fraction=0.1, test_fraction=0.1), sys.argv[2])
except DiskFullError as e:
    print("DISK_FULL", e)
    sys.exit(3)
"""


def _alpaca(path: Path, n: int) -> Path:
    # Distinct random words: near-duplicate detection keeps them all, and Parquet cannot compress them away.
    rows = [{"instruction": f"Translate item {i}: {os.urandom(48).hex()}", "output": os.urandom(96).hex()}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_stage_disk_full_names_the_file_and_leaves_no_folder(tmp_path):
    src = _alpaca(tmp_path / "in.jsonl", 2000)  # about 700 KB of splits
    out = tmp_path / "out"
    proc = _run_limited(DATA.replace("sys.argv[1]", repr(str(src))).replace("sys.argv[2]", repr(str(out))), 96 << 10)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    message = proc.stdout
    assert f"could not write {out}/" in message and "the file size limit was reached" in message, message
    assert "free space or choose another folder" in message
    named = message.split(f"could not write {out}/", 1)[1].split(":", 1)[0]
    assert named in ("train.parquet", "validation.parquet", "test.parquet", "quarantine.jsonl", "report.json")
    assert not out.exists() and os.listdir(tmp_path) == ["in.jsonl"]  # absent, and no staging folder left

    # The control: the same data without the limit writes the whole folder.
    ok = subprocess.run([sys.executable, "-c", DATA.replace("sys.argv[1]", repr(str(src))).replace(
        "sys.argv[2]", repr(str(out)))], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (out / "train.parquet").stat().st_size > 96 << 10


def test_data_stage_disk_full_over_an_earlier_run_keeps_that_run_whole(tmp_path):
    out = tmp_path / "out"
    small = _alpaca(tmp_path / "small.jsonl", 50)
    ok = subprocess.run([sys.executable, "-c", DATA.replace("sys.argv[1]", repr(str(small))).replace(
        "sys.argv[2]", repr(str(out)))], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = _alpaca(tmp_path / "big.jsonl", 2000)
    proc = _run_limited(DATA.replace("sys.argv[1]", repr(str(big))).replace("sys.argv[2]", repr(str(out))), 96 << 10)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert f"could not write {out}/" in proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier run, every byte of it
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl", "out", "small.jsonl"]


def test_checkpoint_save_disk_full_names_the_checkpoint_and_leaves_none_half_written(tmp_path, tiny_model_dir,
                                                                                    tiny_tokenized):
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "run"
    code = (f"from qloraflow.train import main\n"
            f"main(['--config', {str(cfg_path)!r}, '--data', {str(tiny_tokenized)!r}, '--out', {str(out)!r}])")
    proc = _run_limited(code, 24 << 10)  # the optimizer state of the first checkpoint is larger
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "DiskFullError" in log and f"could not write {out}/checkpoints/checkpoint-2" in log, log[-3000:]
    assert "the file size limit was reached" in log and "unexpected pos" not in log.split("DiskFullError")[-1]
    checkpoints = out / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")]  # none half written
    assert not (checkpoints / ".staging").exists()  # the room is given back
    assert not (out / "adapter").exists()
