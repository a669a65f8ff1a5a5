"""The ``unsloth`` training backend: the same QLoRA model as ``hf``, built by Unsloth.

``load_unsloth_model(cfg)`` returns a PEFT-wrapped causal LM with the adapter the config describes
(rank, alpha, dropout, target modules, rsLoRA/DoRA, bias, seed) on a base model quantised exactly as
the ``hf`` backend quantises it (the same ``BitsAndBytesConfig``: NF4, double quantisation, bf16
compute), with Unsloth's fused LoRA/MLP/attention kernels and, when ``train.gradient_checkpointing``
is on, its offloaded checkpointing (``use_gradient_checkpointing="unsloth"``: the checkpointed
activations wait in pinned CPU memory instead of on the GPU). ``train_adapter`` then trains it with
the same TRL ``SFTTrainer``, collator and optimiser as ``hf`` and saves a standard PEFT adapter.

Import order matters. Unsloth patches transformers, peft and trl *when it is imported*; imported
after them, some patches do not take. ``qloraflow.train.train_adapter`` therefore resolves the
backend and calls ``import_unsloth()`` before it imports transformers, and a script that imports
transformers itself must call ``import_unsloth()`` first::

    from qloraflow.unsloth_backend import import_unsloth
    import_unsloth()                      # before anything imports transformers / peft / trl
    from qloraflow.train import train_adapter
    train_adapter(load_config("configs/llama3-8b-qlora-a10g.yaml", {"train.backend": "unsloth"}), ...)

Unsloth needs a CUDA GPU for its kernels (on a machine without one it falls back to a plain CPU
path), and it pins transformers<=5.17 and trl<=1.15; see ``pyproject.toml``'s ``unsloth`` extra.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from qloraflow.config import FinetuneConfig
from qloraflow.errors import ConfigError

# Modules Unsloth patches at import time; imported before it, they keep some unpatched code paths.
PATCHED_MODULES = ("transformers", "peft", "trl")


def import_unsloth() -> Any:
    """Import Unsloth (once), before transformers/peft/trl where possible.

    Sets ``UNSLOTH_DISABLE_STATISTICS=1`` unless the caller chose otherwise: a training job should
    not phone home, and on an offline GPU node the attempt only costs time.

    Returns:
        The ``unsloth`` module.

    Raises:
        ConfigError: Unsloth is not installed although ``train.backend`` asks for it.
    """
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    late = [m for m in PATCHED_MODULES if m in sys.modules]
    if late:
        warnings.warn(f"{', '.join(late)} imported before unsloth: some of Unsloth's patches may not apply; "
                      "call qloraflow.unsloth_backend.import_unsloth() before importing them", stacklevel=2)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import unsloth
    except ImportError as e:
        raise ConfigError("train.backend", [
            f"'train.backend' is 'unsloth' but unsloth cannot be imported ({e}); install the extra "
            "(pip install 'qloraflow[unsloth]') or set 'train.backend: hf' (or 'auto')"]) from e
    return unsloth


def unsupported_settings(cfg: FinetuneConfig) -> list[str]:
    """Settings the Unsloth backend cannot honour (it would silently train something else)."""
    problems = []
    if cfg.model.quantization == "8bit":
        problems.append("'model.quantization' is '8bit': the unsloth backend trains 4bit (QLoRA) or none "
                        "(16-bit LoRA); use 'train.backend: hf' for 8-bit")
    if cfg.model.attn_implementation in ("eager", "varlen"):
        problems.append(f"'model.attn_implementation' is {cfg.model.attn_implementation!r}: Unsloth picks its own "
                        "attention kernels; "
                        "use 'sdpa' (or 'train.backend: hf')")
    if cfg.train.use_cpu:
        problems.append("'train.use_cpu' is true: Unsloth's kernels need a CUDA GPU; use 'train.backend: hf'")
    return problems


def bnb_config(cfg: FinetuneConfig) -> Any:
    """The BitsAndBytesConfig to hand Unsloth, or None where its own default is the configured one.

    Unsloth's default 4-bit load is NF4 with double quantisation and the compute dtype, the
    project's default too; that path is its most exercised one, so it is used whenever it matches.
    Otherwise (FP4, no double quantisation) the hf backend's config is passed, which Unsloth keeps.
    """
    if cfg.model.quantization != "4bit":
        return None
    if cfg.model.bnb_4bit_quant_type == "nf4" and cfg.model.double_quant:
        return None
    from qloraflow.precision import quantization_config

    return quantization_config(cfg.model)


def use_flash_varlen_for_packed_rows() -> bool:
    """Send Unsloth's packed rows through ATen's flash varlen kernel on any torch build; True when in use.

    A padding-free batch is one row of several examples. Unsloth attends within each example with
    torch's ``varlen_attn`` when that takes grouped-query attention (torch 2.12 and later); otherwise
    with xformers when it is installed, or else with one SDPA call per run of equal lengths, where
    cuDNN builds a new plan for each new length (tens of ms each, the first times they are seen).
    ``qloraflow.attention.flash_varlen_attn`` has ``varlen_attn``'s signature and takes GQA on torch
    2.11 too, so every image trains packed rows on the same kernel, the one torch's varlen calls.
    """
    import torch

    if not torch.cuda.is_available() or not torch.backends.cuda.is_flash_attention_available():
        return False
    from unsloth.utils import attention_dispatch as dispatch

    from qloraflow.attention import flash_varlen_attn

    if getattr(dispatch, "_TORCH_VARLEN_ATTN", "absent") is None:
        dispatch._TORCH_VARLEN_ATTN = flash_varlen_attn
        # Unsloth prefers torch's kernels to xformers' only when torch has a varlen kernel; now it has.
        dispatch._NATIVE_BEATS_XFORMERS = dispatch._native_beats_xformers(dispatch._visible_capabilities(), True)
    return getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None


def checkpoint_skip_layers(cfg: FinetuneConfig) -> Any:
    """Unsloth's ``checkpoint_skip_layers`` for ``train.gpu_memory_gb`` (see ``qloraflow.memory_budget``).

    0 (every layer recomputes) when checkpointing is off or the budget is 0; otherwise ``"auto"``:
    after the first step Unsloth keeps as many layers un-checkpointed as fit, within the process's
    memory fraction, which a budget below the card's memory sets first.
    """
    import torch

    t = cfg.train
    if not t.gradient_checkpointing or t.gpu_memory_gb == 0 or not torch.cuda.is_available():
        return 0
    from qloraflow.memory_budget import cap_process_memory

    cap_process_memory(t.gpu_memory_gb)
    return "auto"


def load_unsloth_model(cfg: FinetuneConfig) -> Any:
    """The base model with a fresh LoRA adapter, built by Unsloth's ``FastLanguageModel``.

    Args:
        cfg: the pipeline config; the model, lora, tokenize (sequence length), train (gradient
            checkpointing) sections and the seed are used.

    Returns:
        A ``peft.PeftModelForCausalLM`` in training mode, its LoRA parameters trainable and every base
        weight frozen.

    Raises:
        ConfigError: Unsloth is missing, or the config asks for something it cannot do.
    """
    problems = unsupported_settings(cfg)
    if problems:
        raise ConfigError("train.backend=unsloth", problems)
    import_unsloth()
    from unsloth import FastLanguageModel

    # Imported here, after unsloth: train.py's helpers import transformers lazily.
    from qloraflow.precision import compute_dtype

    use_flash_varlen_for_packed_rows()
    quantized = cfg.model.quantization == "4bit"
    checkpointing = "unsloth" if cfg.train.gradient_checkpointing else False
    skip_layers = checkpoint_skip_layers(cfg)
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.model.base_model, revision=cfg.model.revision,
        # Packed rows are sequence_len long; the padding-free collator joins a micro-batch into one row,
        # which Unsloth recognises from the restarting position_ids and does not truncate.
        max_seq_length=cfg.tokenize.sequence_len, dtype=compute_dtype(cfg.model),
        load_in_4bit=quantized, load_in_16bit=not quantized,
        quantization_config=bnb_config(cfg),
        use_gradient_checkpointing=checkpointing, random_state=cfg.seed,
        # The tokenizer comes from the tokenized dataset folder (train_adapter loads it): leave it as is.
        fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora, use_gradient_checkpointing=checkpointing, random_state=cfg.seed,
        max_seq_length=cfg.tokenize.sequence_len, checkpoint_skip_layers=skip_layers)
    model.config.use_cache = False
    return model
