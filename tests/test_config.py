"""The typed config: every YAML under configs/ validates; bad configs list every problem at once."""

from pathlib import Path

import pytest
import yaml

from qloraflow.config import FinetuneConfig, config_from_dict, load_config
from qloraflow.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.data.train_files and cfg.model.base_model


def test_a10g_config_has_the_recipe():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/llama3-8b-qlora-a10g.yaml")
    assert (cfg.model.quantization, cfg.model.bnb_4bit_quant_type, cfg.model.double_quant) == ("4bit", "nf4", True)
    assert cfg.model.compute_dtype == "bfloat16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (cfg.tokenize.sequence_len, cfg.tokenize.packing) == (8192, True)
    t = cfg.train
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.num_epochs) == (2, 4, 3)
    assert (t.optimizer, t.lr_scheduler, t.learning_rate, t.weight_decay, t.max_grad_norm) == (
        "paged_adamw_8bit", "cosine", 2e-4, 0.01, 1.0)
    assert (t.eval_steps, t.save_steps, t.gradient_checkpointing) == (100, 100, True)


def test_all_problems_reported_at_once():
    raw = {
        "model": {"base_model": "m", "load_in_4bit": True, "load_in_8bit": True},
        "data": {"train_files": ["a.jsonl"], "test_files": ["a.jsonl"]},
        "lora": {"r": 0, "lora_alpah": 16},
        "train": {"learning_rate": -1.0},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "bad.yaml")
    msg = str(e.value)
    assert msg.startswith("bad.yaml: 5 config problem(s)")
    assert "'model.load_in_4bit' and 'model.load_in_8bit' are both set" in msg
    assert "unknown key 'lora.lora_alpah' (did you mean 'lora.alpha'?)" in msg
    assert "'lora.r' must be > 0, got 0" in msg
    assert "'train.learning_rate' must be > 0, got -1.0" in msg
    assert "overlaps 'data.train_files'" in msg and "leak" in msg


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"base_model": "m"}, "data": {"train_files": "x.jsonl"},
                          "train": {"micro_batch_size": "2"}, "tokenize": {"chat_template": "vicuna"}})
    msg = str(e.value)
    assert "'data.train_files' must be list[str], got 'x.jsonl'" in msg
    assert "'train.micro_batch_size' must be int, got '2'" in msg
    assert "'tokenize.chat_template' is 'vicuna'; choose one of" in msg


def test_overrides_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"base_model": "m"}, "data": {"train_files": ["a"]}}))
    assert load_config(p, {"train.max_steps": 7}).train.max_steps == 7
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_section_hash_changes_only_with_values():
    a = config_from_dict({"model": {"base_model": "m"}, "data": {"train_files": ["a"]}})
    b = config_from_dict({"model": {"base_model": "m"}, "data": {"train_files": ["a"]}, "train": {"max_steps": 3}})
    assert a.section_json("data") == b.section_json("data")
    assert a.section_json("train") != b.section_json("train")
    assert a.hash() != b.hash()
