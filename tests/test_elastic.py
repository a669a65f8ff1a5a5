"""Multi-GPU training through Flyte's PyTorch plugin, run for real on the CPU.

The Elastic task for two GPUs runs locally the way it runs in its pod: flytekit starts two worker
processes with torch.distributed.elastic (torchrun's launcher), they join one gloo process group,
and each trains the real 4-bit tiny model (bitsandbytes NF4, peft, TRL) with DDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_config

# The train stage's settings need no data digest (its data is the tokenized folder)
NO_FILES = {"data": "", "model": "tiny", "tokenizer": "", "sqlite_db": ""}


def _even_split(src: Path, dst: Path) -> tuple[int, int]:
    """A copy of a tokenized dataset whose train split has an even number of rows; (rows, non-pad tokens)."""
    import datasets
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    train = datasets.load_from_disk(str(src / "train"))
    train = train.select(range(len(train) - len(train) % 2))
    shutil.rmtree(dst / "train")
    train.save_to_disk(str(dst / "train"))
    pad = AutoTokenizer.from_pretrained(src / "tokenizer").pad_token_id
    return len(train), sum(sum(t != pad for t in ids) for ids in train["input_ids"])


def test_elastic_task_trains_one_adapter_on_two_processes(tmp_path, tiny_model_dir, tiny_tokenized):
    from flytekit.types.directory import FlyteDirectory
    from mlflow.tracking import MlflowClient
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import set_seed

    from qloraflow import train as T
    from qloraflow.stages import RunContext, stage_settings
    from qloraflow.tracking import MlflowTracker
    from tasks.train_elastic import train_model_2gpu

    rows, tokens = _even_split(tiny_tokenized, tmp_path / "tok")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tiny_model_dir, **{"train.num_gpus": 2, "train.micro_batch_size": 1, "train.max_steps": -1,
                                         "train.num_epochs": 1.0, "train.save_steps": 4,
                                         "tracking.tracking_uri": uri, "tracking.experiment": "elastic"})
    pipeline = MlflowTracker("elastic", uri, run_name="pipeline")

    settings = stage_settings(cfg, NO_FILES)
    train = dataclasses.replace(settings.train, model_digest=uuid.uuid4().hex)  # this test's own cache entry
    out = train_model_2gpu(settings=train, tok_dir=FlyteDirectory(str(tmp_path / "tok")), execution=settings.execution,
                           context=RunContext(pipeline_run_id=pipeline.run_id, name=cfg.name, experiment="elastic",
                                              tracking_uri=uri))

    summary = dataclasses.asdict(out.result)
    assert summary["world_size"] == 2
    # One epoch of micro-batches of 1 took rows/2 steps: each step trained one row on each rank, and
    # the ranks trained on disjoint halves (every row's tokens counted exactly once).
    assert summary["global_step"] == rows // 2
    assert summary["tokens_seen"] == tokens
    # Both DDP replicas ended with the same adapter, and it is the one rank 0 saved.
    by_rank = summary["adapter_sha256_by_rank"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    train_dir = Path(out.train_dir.download())
    saved = load_file(train_dir / "adapter" / "adapter_model.safetensors")
    assert T.adapter_digest(saved) == by_rank[0]
    assert json.loads((train_dir / "train_result.json").read_text())["adapter_sha256"] == by_rank[0]
    # ... and it trained: every LoRA tensor moved away from the adapter it started from.
    set_seed(cfg.seed)
    initial = get_peft_model_state_dict(T.build_model(cfg, "hf"))
    assert initial.keys() == saved.keys()
    unchanged = [k for k in saved if torch.equal(initial[k].to(saved[k].dtype), saved[k])]
    assert unchanged == []
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # lora_B starts at zero
    # Rank 0 alone opened the stage's MLflow run and logged into it.
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("qloraflow.stage") == "train"]
    assert [r.info.run_id for r in stage_runs] == [summary["mlflow_run_id"]]
    assert len(client.get_metric_history(summary["mlflow_run_id"], "loss")) == summary["global_step"]


def _torchrun_train(cfg_path: Path, data: Path, out: Path) -> dict:
    """``torchrun --nproc-per-node 2 -m qloraflow.train``: the library alone, as on a GPU machine without Flyte."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "qloraflow.train", "--config", str(cfg_path), "--data", str(data), "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "train_result.json").read_text())


def test_ddp_run_resumed_from_a_checkpoint_matches_the_uninterrupted_one(tmp_path, tiny_model_dir, tiny_tokenized):
    cfg = tiny_config(tiny_model_dir, **{"train.num_gpus": 2, "train.max_steps": 6, "train.save_steps": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    whole = _torchrun_train(cfg_path, tiny_tokenized, tmp_path / "whole")
    assert whole["world_size"] == 2 and len(set(whole["adapter_sha256_by_rank"])) == 1
    # Both ranks' RNG states are in the checkpoint that rank 0 published.
    step4 = tmp_path / "whole" / "checkpoints" / "checkpoint-4"
    assert {p.name for p in step4.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # As if killed after step 4: a fresh folder holding only that checkpoint.
    shutil.copytree(step4, tmp_path / "resumed" / "checkpoints" / "checkpoint-4")
    resumed = _torchrun_train(cfg_path, tiny_tokenized, tmp_path / "resumed")
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["global_step"] == 6
    assert resumed["adapter_sha256_by_rank"] == whole["adapter_sha256_by_rank"]  # same adapter, bit for bit


def test_num_gpus_is_one_switch_and_fsdp_asks_for_what_it_needs(tmp_path, tiny_model_dir):
    from flytekit.types.file import FlyteFile

    from qloraflow.config import config_from_dict
    from qloraflow.errors import ConfigError
    from tasks.resolve import resolve_config

    base = {"model": {"base_model": "m"}, "data": {"train_files": ["a.jsonl"]}}
    cfg = config_from_dict(base)
    assert (cfg.train.num_gpus, cfg.train.distributed) == (1, "ddp")  # existing configs train on one GPU
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, "model": {"base_model": "m", "quantization": "8bit"},
                          "train": {"num_gpus": 0, "distributed": "fsdp", "optimizer": "paged_adamw_8bit"}})
    msg = str(e.value)
    assert "'train.num_gpus' must be >= 1, got 0" in msg
    assert "'train.distributed' fsdp cannot shard 8-bit" in msg and "'model.quantization'" in msg
    assert "'model.upcast_unquantized_fp32'" in msg
    assert "'train.optimizer'" in msg

    # A node size the workflow has no task for is refused at launch, before any GPU is asked for.
    raw = tiny_config(tiny_model_dir, **{"train.num_gpus": 3,
                                         "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}).to_dict()
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match=r"'train.num_gpus' is 3; .*2, 4, 8"):
        resolve_config(config=FlyteFile(str(path)))
