"""The demo's tiny base model: a byte-level BPE tokenizer trained on the demo text and a random Llama.

``qloraflow.demo`` builds both from its generated data; tests build smaller ones directly::

    from qloraflow.tinymodel import build_tiny_llama, build_tokenizer
    tokenizer = build_tokenizer(["SELECT name FROM customers;", "How many orders?"] * 50, vocab_size=300)
    model = build_tiny_llama(tokenizer, seed=0, num_hidden_layers=2)
"""

from __future__ import annotations

from typing import Any

from qloraflow.tokenize import TEMPLATES

BOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END, PAD]
# ChatML: <|im_end|> (the EOS) follows the assistant content directly, as label masking expects.
CHAT_TEMPLATE = TEMPLATES["chatml"]
DEFAULT_VOCAB_SIZE = 3072
LM_HEAD_SCALE = 10.0
# hidden 256 / 4 heads = head_dim 64, a size vLLM's CPU attention kernels support.
TINY_LLAMA_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=512)


def build_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers.

    Special tokens: ``<|begin_of_text|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos, ends every
    turn), ``<|pad|>`` (pad, distinct from eos so padding is never mistaken for an end of turn).
    Nothing is added on encode: the chat template writes every marker itself, as the tokenize and
    evaluate stages (``add_special_tokens=False``) and vLLM's chat endpoint expect.

    Args:
        corpus: Training texts (deterministic order gives a deterministic tokenizer).
        vocab_size: Target vocabulary size, special tokens included (fewer when merges run out).

    Returns:
        A ``PreTrainedTokenizerFast`` with the ChatML ``chat_template``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=IM_END, pad_token=PAD, extra_special_tokens=[IM_START],
        model_max_length=TINY_LLAMA_SHAPE["max_position_embeddings"], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer: Any, seed: int, dtype: str = "bfloat16", **shape: Any) -> Any:
    """A ``LlamaForCausalLM`` with random weights, sized for ``tokenizer``.

    Args:
        tokenizer: Gives the vocabulary (rounded up to a multiple of 64) and bos/eos/pad ids.
        seed: Seed of the initialisation (the global torch RNG is left as it was).
        dtype: Dtype of the returned weights (``torch`` attribute name).
        **shape: ``LlamaConfig`` fields overriding ``TINY_LLAMA_SHAPE`` (e.g. num_hidden_layers=2).

    Returns:
        The model in eval mode, with a generation config that stops at eos and pads with pad.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, **{**TINY_LLAMA_SHAPE, **shape})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # LoRA never trains lm_head, and a head drawn at the usual std 0.02 caps the logit of any token
    # near 0.02 * sqrt(hidden) * |normed state| ~ 5: the fine-tuned model could only ever put a few
    # percent on the right token (loss >= ~3, near-uniform outputs). A 10x head lets a trained
    # adapter make confident, stable greedy choices, as a pretrained head does.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model.eval()
