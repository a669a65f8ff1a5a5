"""Merge: a 16-bit merged model that provably equals base + adapter, or a clear failure.

The check has negative controls that must fail: the adapter scaled by 1.5 before merging, one
layer's delta left out, the merge made into another base, and (for the output comparison alone) a
merged config that changes the computation while every weight is right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_config
from qloraflow.errors import MergeVerificationError
from qloraflow.merge import merge_adapter, merge_and_verify, probe_rows, verify_merge
from qloraflow.precision import nudge_by_ulp, ulp
from qloraflow.train import train_adapter


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, tiny_tokenized):
    out = tmp_path_factory.mktemp("trained")
    train_adapter(tiny_config(tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 100}), tiny_tokenized, out)
    return out / "adapter"


@pytest.fixture(scope="module")
def probe(tiny_tokenized):
    return probe_rows(tiny_tokenized, 4)


def edited_adapter(adapter_dir: Path, dest: Path, edit) -> Path:  # noqa: ANN001
    """A copy of the adapter with ``edit(state)`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, dest)
    state = load_file(dest / "adapter_model.safetensors")
    edit(state)
    save_file(state, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


def test_ulp_and_nudge_follow_the_bf16_grid():
    x = torch.tensor([1.0, 3.0, -0.5, 0.0], dtype=torch.bfloat16)
    assert ulp(x).tolist()[:3] == [2**-7, 2**-6, 2**-8]  # 8 significant bits
    assert ulp(torch.tensor([1.0]), torch.float32).item() == 2**-23
    w = torch.tensor([1.5, -1.5, 0.0, 3.0] * 64, dtype=torch.bfloat16)  # off powers of two: equal gaps
    before = w.clone()
    nudge_by_ulp(w, torch.Generator().manual_seed(0))
    moved = (w.float() - before.float()).abs()
    assert torch.equal(moved[2::4], torch.zeros(64))  # zeros stay zero (no NaN bit patterns)
    assert torch.allclose(moved[0::4], torch.full((64,), 2**-7))  # one step of the grid, either way
    assert torch.allclose(moved[3::4], torch.full((64,), 2**-6))
    assert (w.float() > before.float()).any() and (w.float() < before.float()).any()


def test_merged_model_equals_adapter_in_training_dtype(tmp_path, tiny_model_dir, adapter_dir, probe):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    merged = tmp_path / "merged"
    info = merge_and_verify(str(tiny_model_dir), adapter_dir, merged, "bfloat16", probe)
    check = info["verify"]
    weights, outputs = check["weights"], check["outputs"]
    assert weights["adapted"] == 2 * 7 and not weights["outside_bound"] and weights["worst_ulps"] <= 1.0
    assert not weights["unadapted_changed"] and not weights["missing_in_merged"]
    assert 0 <= weights["delta_lost_share"] < 1
    assert outputs["positions"] > 20 and outputs["mean_kl"] <= check["kl_bound"]
    assert check["rounding"]["mean_kl"] > 0  # the measured bound is a real measurement, not zero
    # the standalone check (reference recomputed, one model at a time) gives the same numbers
    again = verify_merge(str(tiny_model_dir), adapter_dir, merged, probe, "bfloat16")
    assert again["outputs"]["mean_kl"] == pytest.approx(outputs["mean_kl"], rel=1e-4, abs=1e-9)
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
    # merge_info.json travels with the folder: no path of where the merge wrote it
    assert str(tmp_path) not in (merged / "merge_info.json").read_text()


def test_adapter_scaled_before_merging_fails(tmp_path, tiny_model_dir, adapter_dir, probe):
    def scale(state):  # noqa: ANN001, ANN202
        for k in state:
            if ".lora_B." in k:
                state[k] = state[k] * 1.5

    scaled = edited_adapter(adapter_dir, tmp_path / "scaled", scale)
    merge_adapter(str(tiny_model_dir), scaled, tmp_path / "merged", "bfloat16")
    with pytest.raises(MergeVerificationError, match=r"14 of 14 adapted tensors are not base \+ adapter"):
        verify_merge(str(tiny_model_dir), adapter_dir, tmp_path / "merged", probe, "bfloat16")


def test_one_layer_left_out_fails_and_is_named(tmp_path, tiny_model_dir, adapter_dir, probe):
    def drop(state):  # noqa: ANN001, ANN202
        key = next(k for k in state if "layers.1.self_attn.v_proj.lora_B" in k)
        state[key] = torch.zeros_like(state[key])

    partial = edited_adapter(adapter_dir, tmp_path / "partial", drop)
    merge_adapter(str(tiny_model_dir), partial, tmp_path / "merged", "bfloat16")
    with pytest.raises(MergeVerificationError, match=r"1 of 14 adapted tensors .* model.layers.1.self_attn.v_proj"):
        verify_merge(str(tiny_model_dir), adapter_dir, tmp_path / "merged", probe, "bfloat16")


def test_merge_into_another_base_fails(tmp_path, tiny_model_dir, tiny_tokenizer, adapter_dir, probe):
    from qloraflow.demo import build_tiny_llama

    other = tmp_path / "other-base"
    build_tiny_llama(tiny_tokenizer, seed=1, num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    merge_adapter(str(other), adapter_dir, tmp_path / "merged", "bfloat16")
    with pytest.raises(MergeVerificationError, match="tensors the adapter does not touch differ"):
        verify_merge(str(tiny_model_dir), adapter_dir, tmp_path / "merged", probe, "bfloat16")


def test_outputs_check_catches_a_config_that_changes_the_computation(tmp_path, tiny_model_dir, adapter_dir, probe):
    """Every weight right, the model wrong: only the comparison of next-token distributions can see it."""
    merged = tmp_path / "merged"
    merge_adapter(str(tiny_model_dir), adapter_dir, merged, "bfloat16")
    config = json.loads((merged / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (merged / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeVerificationError, match="mean KL from base \\+ adapter") as e:
        verify_merge(str(tiny_model_dir), adapter_dir, merged, probe, "bfloat16")
    assert "adapted tensors" not in str(e.value)


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

