"""The plan before launch (qloraflow/plan.py): its predictions on the demo and the 8B config, its error
against the measured runs, the first task's refusal of a config that cannot fit the train GPU, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from qloraflow.config import load_config
from qloraflow.plan import (GPUS, ModelShape, check_fit, data_tokens, estimate_tokens, fit_problems, format_plan,
                            plan_config, read_model_shape)

A10G_CONFIG = ROOT / "configs" / "llama3-8b-qlora-a10g.yaml"
CALIBRATION = json.loads((ROOT / "benchmarks" / "plan_calibration.json").read_text())
LLAMA3_8B = CALIBRATION["shapes"]["llama3-8b"]
SHAPE_8B = ModelShape.from_config(LLAMA3_8B)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qloraflow.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def model_folder(path: Path, config: dict) -> Path:
    """A model folder as the launch checks see it: config.json and a complete (tiny) safetensors file."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


def test_plan_of_the_8b_config_matches_its_measured_run():
    cfg = load_config(A10G_CONFIG, {"train.backend": "hf"})
    plan = plan_config(cfg, "h200", shape=SHAPE_8B)
    assert 5.0 < plan.memory["weights"] < 5.6  # 7.0B NF4 decoder weights + 1.05B bf16 embeddings and lm_head
    assert plan.reserved_gib == pytest.approx(16.33, rel=0.10)  # measured: benchmarks/train.py --backend hf
    assert plan.tokens_per_s == pytest.approx(4018, rel=0.25)
    a10g = plan_config(cfg, "a10g", shape=SHAPE_8B)
    assert a10g.fits and a10g.reserved_gib == plan.reserved_gib  # same memory, a slower card
    assert a10g.tokens_per_s < plan_config(cfg, "l4", shape=SHAPE_8B).tokens_per_s < plan.tokens_per_s
    # Memory grows with the micro-batch and falls with checkpoints offloaded (Unsloth's) and no SDPA mask.
    bigger = plan_config(load_config(A10G_CONFIG, {"train.backend": "hf", "train.micro_batch_size": 4}), "a10g",
                         shape=SHAPE_8B)
    unsloth = plan_config(load_config(A10G_CONFIG, {"train.backend": "unsloth"}), "a10g", shape=SHAPE_8B)
    assert not bigger.fits and bigger.device_gib > a10g.gpu.memory_gib
    assert unsloth.reserved_gib < plan.reserved_gib and unsloth.tokens_per_s > a10g.tokens_per_s


def test_plan_of_the_demo_config(small_demo, tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["data"].update(train_files=[str(small_demo / "data" / "train.jsonl")],
                       test_files=[str(small_demo / "data" / "test.jsonl")])
    raw["model"]["base_model"] = str(small_demo / "base-model")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "tiny.yaml")
    shape = read_model_shape(cfg.model.base_model)
    assert shape is not None and (shape.layers, shape.hidden) == (4, 256)
    data = data_tokens(cfg)
    assert "base tokenizer" in data.source and data.examples > 150
    plan = plan_config(cfg, "a10g", data=data)
    assert plan.fits and plan.device_gib < 2
    assert plan.optimizer_steps == 400  # train.max_steps
    assert plan.hours > 0 and plan.cost == pytest.approx(plan.gpu_hours * GPUS["a10g"].price_per_hour)
    assert any("train.use_cpu" in n for n in plan.notes)
    assert fit_problems(cfg, "a10g") == []
    text = format_plan(plan)
    assert "fits" in text and "tokens/s" in text and "GPU hours" in text


def test_token_counts_from_the_report_and_estimated_from_the_files(tiny_tokenized, tiny_model_dir):
    from conftest import tiny_config

    report = data_tokens(tiny_config(tiny_model_dir), str(tiny_tokenized))
    truth = json.loads((tiny_tokenized / "report.json").read_text())["splits"]["train"]
    assert (report.tokens, report.rows, report.examples) == (truth["tokens"], truth["rows"], truth["examples"])
    cfg = tiny_config(tiny_model_dir, **{"data.train_files": [str(tiny_tokenized.parent / "data" / "train.parquet")],
                                         "data.validation_fraction": 0.0, "tokenize.sequence_len": 128})
    estimate = estimate_tokens(cfg)
    assert estimate.examples == truth["examples"]
    assert estimate.tokens == pytest.approx(truth["tokens"], rel=0.3)  # template tokens are guessed, 8 a turn


def test_calibration_error_within_the_targets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plan_error

    rows = plan_error.errors(plan_error.load_runs(), plan_error.CONSTANTS)
    memory = [abs(r["memory_error"]) for r in rows if r["memory_error"] is not None]
    speed = [abs(r["tps_error"]) for r in rows if r["tps_error"] is not None]
    assert len(rows) >= 6 and {r["backend"] for r in rows} == {"hf", "unsloth"}
    assert len({r["seq_x_mb"] for r in rows}) >= 3
    # Two runs of one config were measured 1.0 and 1.2 GiB apart on different days: no model is within 10% of both.
    assert sum(e <= 0.10 for e in memory) >= len(memory) - 1 and max(memory) < 0.12
    assert max(speed) <= 0.25
    assert "within 10%" in plan_error.report(rows)


def test_the_first_task_refuses_a_config_that_cannot_fit_the_train_gpu(tmp_path):
    from flytekit.types.file import FlyteFile

    from tasks import policy
    from tasks.resolve import resolve_config

    model = model_folder(tmp_path / "llama3-8b", {**LLAMA3_8B, "model_type": "llama"})
    (tmp_path / "train.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    raw = yaml.safe_load(A10G_CONFIG.read_text())
    raw["model"]["base_model"] = str(model)
    raw["data"].update(train_files=[str(tmp_path / "train.jsonl")], test_files=[])
    raw["train"].update(backend="hf", micro_batch_size=4)
    raw["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "too-big.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert policy.TRAIN_GPU == "a10g"
    with pytest.raises(Exception) as e:
        resolve_config(config=FlyteFile(str(path)))
    msg = str(e.value)
    assert "predicted peak GPU memory 30.5 GiB" in msg and "a10g" in msg and "(22.2 GiB)" in msg
    assert "train.micro_batch_size: 2 (and gradient_accumulation_steps: 8) (predicted 16.7 GiB)" in msg
    assert not (tmp_path / "mlflow.db").exists()  # refused before the pipeline's run was opened
    refused = cli("validate", str(path))  # the same check, before launching
    assert refused.returncode == 2 and "predicted peak GPU memory 30.5 GiB" in refused.stderr
    assert cli("validate", str(path), "--gpu", "h200").returncode == 0

    # Negative controls: the config's own micro-batch fits; the same shape on the CPU is never refused.
    assert check_fit(load_config(path, {"train.micro_batch_size": 2}), str(path), "a10g") == (
        "predicted peak GPU memory 16.7 GiB of the a10g's 22.2 GiB")  # the line the first task prints
    assert fit_problems(load_config(path, {"train.use_cpu": True}), "a10g") == []
    assert fit_problems(load_config(path), "h200") == []
    # A Hub model whose config.json cannot be read offline is left to the download, not refused.
    assert fit_problems(load_config(path, {"model.base_model": "no-such-org/no-such-model"}), "a10g") == []


def test_plan_command(tmp_path, tiny_tokenized):
    proc = cli("plan", "-h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: qloraflow plan") and "--price-per-hour" in proc.stdout
    assert all(g in proc.stdout for g in GPUS)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    base = ["plan", str(A10G_CONFIG), "--model-config", str(tmp_path / "config.json"), "--set", "train.backend=hf"]
    fits = cli(*base, "--tokenized", str(tiny_tokenized), "--price-per-hour", "2.5")
    assert fits.returncode == 0, fits.stderr
    assert "(fits)" in fits.stdout and "$2.50" in fits.stdout and "tokenize report" in fits.stdout
    too_big = cli(*base, "--no-data", "--set", "train.micro_batch_size=4", "--json")
    assert too_big.returncode == 1, too_big.stderr
    out = json.loads(too_big.stdout)
    assert out["fits"] is False and out["peak_gib"] > 22.19 and out["memory_gib"]["attention_mask"] > 1
    no_data = cli(*base)  # the config's data/train.jsonl is not in the checkout
    assert no_data.returncode == 2 and "data/train.jsonl" in no_data.stderr and "--no-data" in no_data.stderr
    unknown = cli("plan", str(A10G_CONFIG), "--gpu", "v100")
    assert unknown.returncode == 2 and "invalid choice: 'v100'" in unknown.stderr
    hub = cli("plan", str(A10G_CONFIG), "--no-data", "--set", "model.base_model=no-such-org/no-such-model")
    assert hub.returncode == 2 and "--model-config" in hub.stderr
    # meta-llama/... is gated and not on this machine: its published shape, said so, gives the same plan
    table = cli("plan", str(A10G_CONFIG), "--no-data", "--set", "train.backend=hf", "--json")
    assert table.returncode == 0, table.stderr
    given = cli(*base, "--no-data", "--json")
    assert json.loads(table.stdout)["peak_gib"] == json.loads(given.stdout)["peak_gib"]
    assert "KNOWN_SHAPES" in cli("plan", str(A10G_CONFIG), "--no-data").stdout
