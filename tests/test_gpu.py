"""QLoRA on a real CUDA GPU, both backends: a few steps of ``train_adapter`` on the tiny model, then
the adapter folder is loaded with plain peft. Skipped where there is no GPU (CI); run on a GPU
machine with ``python -m pytest tests/test_gpu.py -m gpu``. The Unsloth test also needs unsloth
installed, and runs in its own process because Unsloth must be imported before transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 6


def gpu_config(model_dir: Path, backend: str, **overrides):
    # upcast off, as in configs/llama3-8b-qlora-a10g.yaml (the switch only concerns the hf backend)
    return tiny_config(model_dir, **{"model.upcast_unquantized_fp32": False, **overrides,
                                     "train.use_cpu": False, "train.backend": backend, "train.max_steps": STEPS,
                                     "train.gradient_checkpointing": True, "train.save_steps": 1000,
                                     "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]})


def check_adapter(out: Path, cfg, base_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter folder holds the configured LoRA, every B matrix trained, and loads with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    assert sorted(conf["target_modules"]) == sorted(cfg.lora.target_modules)
    assert (conf["use_rslora"], conf["use_dora"]) == (False, False)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # A and B of 7 projections in each of the 2 layers
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    # B starts at zero: a non-zero B in every module means every adapted module was trained.
    untrained = [k for k, w in weights.items() if "lora_B" in k and not w.abs().sum() > 0]
    assert untrained == []

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[1, 5, 9, 17]], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()
    return weights


def unquantized_dtypes(model) -> dict[str, torch.dtype]:
    """Dtypes of the frozen weights bitsandbytes left unquantised (embeddings, norms, lm_head)."""
    out = {n: p.dtype for n, p in model.named_parameters()
           if not p.requires_grad and p.__class__.__name__ != "Params4bit"}
    assert out
    return out


def test_hf_backend_trains_on_cuda(tmp_path, tiny_model_dir, tiny_tokenized):
    import bitsandbytes as bnb
    from transformers import set_seed

    from qloraflow import train as T

    cfg = gpu_config(tiny_model_dir, "hf")
    set_seed(cfg.seed)
    model = T.build_model(cfg, "hf")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7
    assert all(m.weight.device.type == "cuda" and m.weight.quant_state.quant_type == "nf4"
               and m.weight.quant_state.nested for m in linear4)
    # Frozen unquantised weights (embeddings, norms, lm_head) stay bf16: no fp32 residual stream...
    assert set(unquantized_dtypes(model).values()) == {torch.bfloat16}
    del model
    # ... unless model.upcast_unquantized_fp32 asks for peft's prepare_model_for_kbit_training.
    upcast = T.build_model(gpu_config(tiny_model_dir, "hf", **{"model.upcast_unquantized_fp32": True}), "hf")
    assert set(unquantized_dtypes(upcast).values()) == {torch.float32}
    del upcast
    torch.cuda.empty_cache()

    summary = T.train_adapter(cfg, tiny_tokenized, tmp_path / "hf")
    assert summary["backend"] == "hf" and summary["global_step"] == STEPS
    assert summary["gpu_peak_reserved_gib"] > 0
    check_adapter(tmp_path / "hf", cfg, tiny_model_dir)


UNSLOTH_RUN = r"""
import json, sys
from qloraflow.unsloth_backend import import_unsloth
import_unsloth()
import bitsandbytes as bnb, torch
from qloraflow.config import config_from_dict
from qloraflow.train import train_adapter
from qloraflow.unsloth_backend import load_unsloth_model

cfg = config_from_dict(json.loads(sys.argv[1]))
model = load_unsloth_model(cfg)
layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
info = {"linear4bit": len(layers), "nf4": all(m.weight.quant_state.quant_type == "nf4" for m in layers),
        "nested": all(m.weight.quant_state.nested for m in layers),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
del model, layers
torch.cuda.empty_cache()
summary = train_adapter(cfg, sys.argv[2], sys.argv[3])
print("RESULT " + json.dumps({"info": info, "summary": summary}))
"""


@pytest.mark.skipif(find_spec("unsloth") is None, reason="unsloth is not installed")
def test_unsloth_backend_trains_the_same_adapter_shape(tmp_path, tiny_model_dir, tiny_tokenized):
    cfg = gpu_config(tiny_model_dir, "unsloth")
    env = dict(os.environ, PYTHONUNBUFFERED="1", UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", UNSLOTH_RUN, json.dumps(cfg.to_dict()), str(tiny_tokenized),
                           str(tmp_path / "unsloth")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    info, summary = result["info"], result["summary"]
    assert info["linear4bit"] == 2 * 7 and info["nf4"] and info["nested"]  # same NF4 double quant as hf
    assert info["trainable"] and all("lora_" in n for n in info["trainable"])
    assert len(info["trainable"]) == 2 * 7 * 2
    assert summary["backend"] == "unsloth" and summary["global_step"] == STEPS

    weights = check_adapter(tmp_path / "unsloth", cfg, tiny_model_dir)
    hf_cfg = gpu_config(tiny_model_dir, "hf")
    from qloraflow import train as T

    T.train_adapter(hf_cfg, tiny_tokenized, tmp_path / "hf")
    hf_weights = load_file(tmp_path / "hf" / "adapter" / "adapter_model.safetensors")
    # The same modules adapted, with the same shapes: the adapters are interchangeable downstream.
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in hf_weights.items()}


def per_example_sdpa(q, k, v, lengths):
    """Causal SDPA on each example alone: what attention over a packed row must equal."""
    import torch.nn.functional as F

    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        out.append(F.scaled_dot_product_attention(*(x[s].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                                                  enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def test_flash_varlen_attention_equals_each_example_alone_forward_and_backward():
    """``flash_varlen_attn`` (the kernel of ``varlen`` attention and of Unsloth's packed rows) on a packed
    row with grouped-query heads: outputs and all three gradients equal per-example SDPA's."""
    from qloraflow.attention import flash_varlen_attn

    lengths = [37, 300, 5, 190, 1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, 128, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (32, 8, 8))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = flash_varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0), enable_gqa=True)
    grad = torch.randn(out.shape, generator=g, device="cuda", dtype=out.dtype)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = per_example_sdpa(q, k, v, lengths)
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)
    # Without the boundaries the examples would see each other: the check can tell.
    whole = torch.tensor([0, sum(lengths)], dtype=torch.int32, device="cuda")
    leaky = flash_varlen_attn(q, k, v, whole, whole, sum(lengths), sum(lengths), window_size=(-1, 0))
    assert not torch.allclose(leaky[40:].float(), ref_out[40:].float(), rtol=2e-2, atol=2e-2)


UNSLOTH_PACKED_RUN = r"""
import json, sys
from qloraflow.unsloth_backend import import_unsloth
import_unsloth()
import torch
from unsloth.utils import attention_dispatch as dispatch
from qloraflow.attention import flash_varlen_attn
from qloraflow.config import config_from_dict
from qloraflow.train import Collator
from qloraflow.unsloth_backend import load_unsloth_model

cfg = config_from_dict(json.loads(sys.argv[1]))
lengths = json.loads(sys.argv[2])
model = load_unsloth_model(cfg)  # training mode, LoRA dropout 0: deterministic
kernel, calls = dispatch._TORCH_VARLEN_ATTN, []
def counting(*args, **kwargs):
    calls.append(1)
    return kernel(*args, **kwargs)
dispatch._TORCH_VARLEN_ATTN = counting

g = torch.Generator().manual_seed(0)
examples = [torch.randint(3, 390, (n,), generator=g) for n in lengths]
rows = [{"input_ids": e.tolist(), "labels": e.tolist(), "position_ids": list(range(len(e)))} for e in examples]
batch = Collator(pad_token_id=0, padding_free=True, boundaries="unsloth")(rows)
with torch.no_grad():
    packed = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                   packed_seq_lengths=batch["packed_seq_lengths"].cuda()).logits[0].float()
    packed_calls = len(calls)
    alone = torch.cat([model(input_ids=e[None].cuda()).logits[0].float() for e in examples])
    # Negative control: the same row as one sequence, the examples seeing each other.
    joined = model(input_ids=batch["input_ids"].cuda(),
                   position_ids=torch.arange(sum(lengths))[None].cuda()).logits[0].float()
torch.save({"packed": packed.cpu(), "alone": alone.cpu(), "joined": joined.cpu()}, sys.argv[3])
print("RESULT " + json.dumps({"packed_calls": packed_calls, "ours": kernel is flash_varlen_attn,
                              "layers": model.config.num_hidden_layers, "torch": torch.__version__}))
"""


@pytest.mark.skipif(find_spec("unsloth") is None, reason="unsloth is not installed")
def test_unsloth_packed_rows_give_each_example_its_own_logits(tmp_path, tiny_model_dir):
    """Unsloth's model on a padding-free row of several examples (the collator's ``packed_seq_lengths``)
    returns, for every token, the logits of that example run alone, through the flash varlen kernel
    ``use_flash_varlen_for_packed_rows`` installs on torch builds without a GQA varlen kernel."""
    from packaging.version import Version

    # sequence_len above the row: Unsloth would truncate the negative control (no packed lengths) to it
    cfg = gpu_config(tiny_model_dir, "unsloth", **{"lora.dropout": 0.0, "tokenize.sequence_len": 256})
    lengths = [37, 120, 5, 90, 1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", UNSLOTH_PACKED_RUN, json.dumps(cfg.to_dict()), json.dumps(lengths),
                           str(tmp_path / "logits.pt")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    # The packed row went through the varlen kernel, once per layer, and on torch 2.11 it is ours.
    assert info["packed_calls"] == info["layers"]
    if Version(info["torch"]) < Version("2.12"):
        assert info["ours"]
    logits = torch.load(tmp_path / "logits.pt")
    assert logits["packed"].shape == logits["alone"].shape == (sum(lengths), logits["packed"].shape[-1])
    # Errors relative to the largest logit: a random model's logits are small, bf16 rounds at ~0.4%.
    scale = logits["alone"].abs().max()
    err = float((logits["packed"] - logits["alone"]).abs().max() / scale)
    assert err < 0.02, f"packed-row logits differ from per-example logits by {err:.2%} of the largest logit"
    # Negative control: the same row as one sequence. The first example sees nothing else either way;
    # every later one sees the examples before it, which the check must be able to tell.
    first = lengths[0]
    leak_first = float((logits["joined"][:first] - logits["alone"][:first]).abs().max() / scale)
    leak = float((logits["joined"][first:] - logits["alone"][first:]).abs().max() / scale)
    print(f"packed vs alone {err:.3%}, joined vs alone {leak:.1%} of the largest logit")
    assert leak_first < 0.02 and leak > max(0.05, 10 * err), (leak_first, leak, err)
