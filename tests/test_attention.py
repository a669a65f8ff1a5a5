"""``model.attn_implementation: varlen``: each example of a packed row attends to itself only.

PyTorch's varlen flash kernel needs a CUDA GPU, so on the CPU the same wiring (boundaries read off
``position_ids``, heads and grouped-query heads laid out for the kernel, causal) drives a reference
kernel with the kernel's signature that runs SDPA on each example. The packed row's logits must equal
each example's logits computed alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn`` semantics in plain SDPA, one example at a time."""
    assert window_size == (-1, 0)  # the wiring must ask for causal attention
    out = torch.empty_like(query)
    for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (x[s:e].transpose(0, 1).float() for x in (query, key, value))
        out[s:e] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1).to(query.dtype)
    return out


def twin_models():
    """(sdpa model, varlen model) of one tiny GQA Llama with the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qloraflow.attention import register_varlen_attention

    name = register_varlen_attention(reference_varlen_attn)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # GQA
    torch.manual_seed(0)
    # each model its own config: _from_config records the attention implementation on the config it is given
    plain = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    varlen = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=name, dtype=torch.bfloat16).eval()
    assert plain.config._attn_implementation == "sdpa"
    varlen.load_state_dict(plain.state_dict())
    return plain, varlen


def test_packed_row_logits_equal_each_example_alone():
    plain, varlen = twin_models()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 300, (n,), generator=g) for n in (7, 19, 12)]
    packed = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with torch.no_grad():
        got = varlen(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([plain(input_ids=e[None], use_cache=False).logits[0] for e in examples])
        as_one = plain(input_ids=packed, use_cache=False).logits[0]  # no boundaries: examples see each other
    torch.testing.assert_close(got.float(), alone.float(), rtol=2e-2, atol=2e-2)
    later = slice(len(examples[0]), None)
    assert not torch.allclose(as_one[later].float(), alone[later].float(), rtol=2e-2, atol=2e-2)


def test_speed_switches_need_a_gpu_and_the_hf_backend_and_reach_the_trainer(tiny_model_dir, tmp_path):
    from qloraflow import train as T
    from qloraflow.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_config(tiny_model_dir, **{"model.attn_implementation": "varlen", "train.liger_kernel": True,
                                       "train.activation_offloading": True, "train.use_cpu": True})
    text = str(e.value)
    assert "'model.attn_implementation' varlen needs a CUDA GPU" in text
    assert "'train.liger_kernel' needs a CUDA GPU" in text
    assert "'train.activation_offloading' needs a CUDA GPU" in text
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny_model_dir, **{"train.liger_kernel": True, "train.activation_offloading": True,
                                       "train.backend": "unsloth", "train.use_cpu": False})
    assert "'train.liger_kernel' is for the hf backend" in str(e.value)
    assert "'train.activation_offloading' is for the hf backend" in str(e.value)
    cfg = tiny_config(tiny_model_dir, **{"train.liger_kernel": True, "train.activation_offloading": True,
                                         "train.use_cpu": False})
    args = T.training_arguments(cfg, tmp_path, has_eval=False)
    assert args.use_liger_kernel and args.activation_offloading
    assert not T.training_arguments(tiny_config(tiny_model_dir), tmp_path, has_eval=False).activation_offloading


def test_boundaries_from_the_batch_reach_the_attention_through_the_model():
    """The collator's ``cu_seq_lens_q`` / ``max_length_q`` flow through transformers' model to the varlen
    attention and are used as given (no sync to read them off ``position_ids`` on the GPU): with
    positions that never restart, the examples stay apart only if the batch's boundaries are used."""
    from qloraflow.train import Collator

    plain, varlen = twin_models()
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 14)]
    rows = [{"input_ids": e, "labels": e, "position_ids": list(range(len(e)))} for e in examples]
    batch = Collator(0, padding_free=True, boundaries="flash")(rows)
    del batch["labels"]
    with torch.no_grad():
        got = varlen(**batch, use_cache=False).logits[0]
        alone = torch.cat([plain(input_ids=torch.tensor([e]), use_cache=False).logits[0] for e in examples])
        # the same boundaries, the positions of one long sequence: RoPE differs, the separation must not
        shifted = dict(batch, position_ids=torch.arange(23)[None])
        second_alone = plain(input_ids=torch.tensor([examples[1]]), position_ids=torch.arange(9, 23)[None],
                             use_cache=False).logits[0]
        got_shifted = varlen(**shifted, use_cache=False).logits[0]
    torch.testing.assert_close(got.float(), alone.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_shifted[9:].float(), second_alone.float(), rtol=2e-2, atol=2e-2)
