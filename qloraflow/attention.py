"""``model.attn_implementation: varlen``: attention over the examples of a packed row, and only those.

A packed row (see ``qloraflow.tokenize.pack_rows``) holds several examples, each with its own run of
``position_ids``. With ``sdpa``, transformers materialises a block-diagonal causal mask for the row
and the kernel still computes the whole (N x N) product; PyTorch's variable-length flash kernel
(``torch.nn.attention.varlen.varlen_attn``) takes the examples' boundaries (cumulative lengths, read
off the ``position_ids``) and attends within each example only: less work and no mask in memory.
It needs a CUDA GPU with flash attention (Ampere or newer) and bf16/fp16 activations.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

NAME = "qloraflow_varlen"


def varlen_attention(kernel: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    """A transformers attention function calling ``kernel`` (default: PyTorch's varlen flash attention)."""
    import torch

    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    params = inspect.signature(kernel).parameters

    def forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                scaling: Optional[float] = None, dropout: float = 0.0, position_ids: Optional[torch.Tensor] = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        b, h, n, d = query.shape  # (batch, heads, tokens, head dim); a packed batch is (1, h, N, d)
        if position_ids is None:
            position_ids = torch.arange(n, device=query.device).repeat(b)
        starts = torch.nonzero(position_ids.reshape(-1) == 0).flatten()
        cu = torch.cat([starts, starts.new_tensor([b * n])]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d).to(dtype) for x in (query, key, value))
        # causal: torch 2.11 spells it is_causal=True, later releases window_size=(-1, 0)
        extra: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if key.shape[1] != h:  # grouped-query attention
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(h // key.shape[1], dim=1), v.repeat_interleave(h // key.shape[1], dim=1)
        if scaling is not None and "scale" in params:
            extra["scale"] = scaling
        out = kernel(q, k, v, cu, cu, max_len, max_len, **extra)
        return out.reshape(b, n, h, d).to(query.dtype), None

    return forward


def register_varlen_attention(kernel: Optional[Callable[..., Any]] = None) -> str:
    """Register the varlen attention with transformers; returns the name to pass as ``attn_implementation``.

    Its mask function is FlashAttention-2's (no mask is built: the boundaries come from ``position_ids``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention(kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return NAME


def attention_implementation(configured: str) -> str:
    """What to hand ``from_pretrained``: the configured name, with ``varlen`` registered first."""
    return register_varlen_attention() if configured == "varlen" else configured
