"""QLoRA training on the CPU with the real stack (bitsandbytes 4-bit, peft, trl): what it trains,
what it freezes, and that a killed run resumes to the same adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_config
from qloraflow.precision import cpu_has_native_bf16
from qloraflow import train as T


def test_4bit_layers_are_nf4_double_quant_and_training_touches_only_lora(tmp_path, tiny_model_dir, tiny_tokenized):
    import bitsandbytes as bnb
    from transformers import AutoTokenizer, set_seed

    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.gradient_checkpointing": True})
    set_seed(cfg.seed)
    model = T.build_model(cfg, "hf")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # every projection of both layers
    for m in linear4:
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantisation of the constants
        # bf16 as configured, or float32 on a CPU that only emulates bf16 (precision.compute_dtype)
        assert m.compute_dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)

    # Compare the state dict: bitsandbytes may repack 4-bit weights in memory for its CPU kernel, and
    # the state dict always holds the canonical NF4 bytes and quantisation constants.
    # Compared as raw bytes: packed NF4 stored in bf16 can hold NaN bit patterns, and NaN != NaN.
    raw = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8).clone()  # noqa: E731
    before = {n: raw(t) for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_ds, val_ds = T.load_datasets(tiny_tokenized)
    tok = AutoTokenizer.from_pretrained(tiny_tokenized / "tokenizer")
    trainer = T.build_trainer(cfg, model, tok, train_ds, val_ds, tmp_path / "unused", [])
    trainer.args.save_strategy = "no"
    trainer.train()
    after = {n: raw(t) for n, t in model.state_dict().items()}
    unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert unchanged == []  # every LoRA parameter moved
    changed_frozen = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert changed_frozen == []  # no base weight did


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _train_cli(cfg_path: Path, data: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qloraflow.train", "--config", str(cfg_path), "--data", str(data),
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_same_seed_same_adapter_and_sigkill_resume_matches(tmp_path, tiny_model_dir, tiny_tokenized):
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 8, "train.save_steps": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))

    ref = T.train_adapter(cfg, tiny_tokenized, tmp_path / "a")
    again = T.train_adapter(cfg, tiny_tokenized, tmp_path / "b")
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # deterministic on the CPU
    assert ref["train_loss_last"] == again["train_loss_last"]

    # A real process kill while checkpoint 6 is being written, after checkpoint 4 is complete.
    proc = _train_cli(cfg_path, tiny_tokenized, tmp_path / "c")
    checkpoints = tmp_path / "c" / "checkpoints"
    staging = checkpoints / ".staging" / "checkpoint-6"
    deadline = time.monotonic() + 240
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert staging.exists(), "the kill was meant to land mid-save"
    assert not (checkpoints / "checkpoint-6").exists()  # a half-written checkpoint never takes the name
    assert (checkpoints / "checkpoint-4" / "manifest.json").exists()
    assert not (tmp_path / "c" / "adapter").exists()

    resumed = _train_cli(cfg_path, tiny_tokenized, tmp_path / "c")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "discarding unfinished checkpoint save(s) ['checkpoint-6']" in out
    c = _adapter(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)
    summary = yaml.safe_load((tmp_path / "c" / "train_result.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert summary["train_loss_last"] == pytest.approx(ref["train_loss_last"], rel=1e-4)


def test_half_written_last_checkpoint_is_skipped(tmp_path, tiny_model_dir, tiny_tokenized):
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 2})
    T.train_adapter(cfg, tiny_tokenized, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "checkpoint-4" / "manifest.json").unlink()  # as if killed while writing step 4
    with pytest.warns(UserWarning, match="checkpoint-4.*no manifest"):
        summary = T.train_adapter(cfg, tiny_tokenized, tmp_path / "run")
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["global_step"] == 4


def test_init_adapter_starts_from_saved_weights_and_rejects_a_mismatch(tmp_path, tiny_model_dir):
    from transformers import set_seed

    from qloraflow.errors import ConfigError

    cfg = tiny_config(tiny_model_dir)
    set_seed(cfg.seed)
    first = T.build_model(cfg, "hf")
    for n, p in first.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # fresh LoRA B is zero: make the saved adapter unlike a fresh one
    first.save_pretrained(tmp_path / "init")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}

    set_seed(cfg.seed + 1)  # a different fresh initialisation, overwritten by the saved weights
    warm = T.build_model(tiny_config(tiny_model_dir, **{"lora.init_adapter": str(tmp_path / "init")}), "hf")
    got = {n: p for n, p in warm.named_parameters() if p.requires_grad}
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[n], saved[n]) for n in saved)

    with pytest.raises(ConfigError, match="lora.init_adapter.*same r"):
        T.build_model(tiny_config(tiny_model_dir, **{"lora.init_adapter": str(tmp_path / "init"), "lora.r": 4}), "hf")
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        T.build_model(tiny_config(tiny_model_dir, **{"lora.init_adapter": str(tmp_path)}), "hf")


def test_killed_after_the_last_checkpoint_resumes_to_the_same_adapter_without_extra_steps(
        tmp_path, tiny_model_dir, tiny_tokenized):
    import shutil

    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 2})
    first = T.train_adapter(cfg, tiny_tokenized, tmp_path / "run")
    done = _adapter(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "adapter")  # as if killed after checkpoint-4, before the adapter
    again = T.train_adapter(cfg, tiny_tokenized, tmp_path / "run")
    assert again["resumed_from"].endswith("checkpoint-4")
    assert again["global_step"] == 4  # the Trainer alone would train a fifth step here
    resumed = _adapter(tmp_path / "run")
    assert all(torch.equal(resumed[k], done[k]) for k in done)
    assert again["train_loss_last"] == first["train_loss_last"]


def test_token_count_from_the_batch_shape_equals_the_trainers_count(tmp_path, tiny_model_dir, tiny_tokenized):
    """``with_host_token_count``: padding-free batches are counted from their shape, without the
    Trainer's GPU sum and sync; the count equals the Trainer's own, and every token of the rows seen."""
    from transformers import AutoTokenizer

    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": -1, "train.num_epochs": 1})  # every row once
    assert cfg.tokenize.packing
    train_ds, _ = T.load_datasets(tiny_tokenized)
    tok = AutoTokenizer.from_pretrained(tiny_tokenized / "tokenizer")
    seen = {}
    for name, wrap in (("host", T.with_host_token_count), ("trainer", lambda cls: cls)):
        original = T.with_host_token_count
        T.with_host_token_count = wrap
        try:
            trainer = T.build_trainer(cfg, T.build_model(cfg, "hf"), tok, train_ds, None,
                                      tmp_path / name, [])
        finally:
            T.with_host_token_count = original
        assert (type(trainer).__name__ == "HostTokenCountTrainer") == (name == "host")
        trainer.args.save_strategy = "no"
        trainer.train()
        seen[name] = trainer.state.num_input_tokens_seen
    assert seen["host"] == seen["trainer"] == sum(len(ids) for ids in train_ds["input_ids"])


def test_cpu_training_falls_back_to_float32_where_bf16_is_emulated(tiny_model_dir):
    """The configured dtype on a CPU with bf16 hardware; float32 (10x faster there) on one without it."""
    from qloraflow.precision import compute_dtype, cpu_has_native_bf16

    cfg = tiny_config(tiny_model_dir)
    assert cfg.model.compute_dtype == "bfloat16"
    assert compute_dtype(cfg.model, use_cpu=True) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    cfg.model.compute_dtype = "float32"
    assert compute_dtype(cfg.model, use_cpu=True) == torch.float32
