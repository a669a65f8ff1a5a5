"""Merge: a 16-bit merged model that provably equals base + adapter, or a clear failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_config
from qloraflow.errors import MergeVerificationError
from qloraflow.merge import merge_adapter, verify_merge
from qloraflow.train import train_adapter

PROMPTS = ["<|im_start|>user\nWrite an SQLite query: how many customers live in Paris?<|im_end|>\n"
           "<|im_start|>assistant\n", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, tiny_tokenized):
    out = tmp_path_factory.mktemp("trained")
    train_adapter(tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 100}), tiny_tokenized, out)
    return out / "adapter"


def test_merged_model_equals_adapter_in_training_dtype(tmp_path, tiny_model_dir, adapter_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    info = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged", "bfloat16")
    merged = tmp_path / "merged"
    check = verify_merge(str(tiny_model_dir), adapter_dir, merged, PROMPTS, rtol=0.02, dtype_name="bfloat16")
    assert check["relative_logit_diff"] <= 0.02
    # no fp32 doubling: every tensor is bf16 and the file is the size of the base's
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert info["bytes"] == info["base_bytes"]
    # it loads as a plain model: no quantization config, no peft
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    assert AutoConfig.from_pretrained(merged).dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the chat template and EOS ids travel with it, so serving formats prompts as training did
    assert (merged / "chat_template.jinja").exists() or "chat_template" in (merged / "tokenizer_config.json").read_text()
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"]


def test_verification_catches_a_merge_that_differs(tmp_path, tiny_model_dir, adapter_dir):
    from safetensors.torch import load_file, save_file

    merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged", "bfloat16")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = weights[key] + 0.5  # as if merged into the wrong base
    save_file(weights, tmp_path / "merged" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeVerificationError, match="logits differ by up to"):
        verify_merge(str(tiny_model_dir), adapter_dir, tmp_path / "merged", PROMPTS, rtol=0.02, dtype_name="bfloat16")


def test_size_limited_disk_fails_clearly_and_leaves_nothing(tmp_path, tiny_model_dir, adapter_dir):
    """A file-size limit (RLIMIT_FSIZE, what a nearly full disk looks like to a writer) while saving."""
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from qloraflow.merge import MergeError, merge_adapter
try:
    merge_adapter({str(tiny_model_dir)!r}, {str(adapter_dir)!r}, {str(tmp_path / 'merged')!r}, "bfloat16")
except MergeError as e:
    print("MERGE_ERROR", e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert "could not write the merged model" in proc.stdout and "free space" in proc.stdout
    assert os.listdir(tmp_path) == []  # no partial model under the final name, no temporary left
