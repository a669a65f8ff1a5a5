"""``model.attn_implementation: varlen``: attention over the examples of a packed row, and only those.

A packed row (see ``qloraflow.tokenize.pack_rows``) holds several examples, each with its own run of
``position_ids``. With ``sdpa``, transformers materialises a block-diagonal causal mask for the row
and the kernel still computes the whole (N x N) product; PyTorch's variable-length flash kernel
(``flash_varlen_attn`` here: ATen's flash kernels, which torch's ``varlen_attn`` also calls) takes the
examples' boundaries (cumulative lengths, computed by the collator or read off the ``position_ids``)
and attends within each example only: less work and no mask in memory. It needs a CUDA GPU with flash
attention (Ampere or newer) and bf16/fp16 activations.

The same kernel serves the ``unsloth`` backend's packed rows (``qloraflow.unsloth_backend``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

NAME = "qloraflow_varlen"


class _FlashVarlen(torch.autograd.Function):
    """ATen's flash-attention kernels over packed examples.

    The kernels take grouped-query attention natively (fewer key/value heads than query heads), so
    keys and values are never repeated per query head.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):  # noqa: ANN001
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, **window)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, unused)
        ctx.args = (max_q, max_k, scale, causal, window)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        q, k, v, out, lse, cu_q, cu_k, rng, unused = ctx.saved_tensors
        max_q, max_k, scale, causal, window = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused,
            scale=scale, **window)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                      cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: Optional[float] = None,
                      window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (the torch 2.12+ signature) on ATen's flash kernels.

    torch 2.11's ``varlen_attn`` takes no grouped-query attention; the kernels underneath do. Tensors
    are ``(tokens, heads, head dim)`` in bf16/fp16 on a CUDA GPU; ``window_size=(-1, 0)`` is causal.
    ``enable_gqa`` is accepted for the signature's sake: fewer key/value heads always work.
    """
    causal = tuple(window_size) == (-1, 0)
    window = {} if causal or tuple(window_size) == (-1, -1) else {
        "window_size_left": window_size[0], "window_size_right": window_size[1]}
    return _FlashVarlen.apply(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, window)


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative example lengths as int32, longest example) of a packed row, read off its positions."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention(kernel: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    """A transformers attention function calling ``kernel`` (default: ``flash_varlen_attn``), which has
    ``varlen_attn``'s signature.

    The examples' boundaries come from the batch when the collator put them there
    (``cu_seq_lens_q`` / ``max_length_q``, computed on the host: no GPU sync per layer), else from
    ``position_ids``.
    """
    kernel = kernel or flash_varlen_attn

    def forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                scaling: Optional[float] = None, dropout: float = 0.0, position_ids: Optional[torch.Tensor] = None,
                cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        b, h, n, d = query.shape  # (batch, heads, tokens, head dim); a packed batch is (1, h, N, d)
        if cu_seq_lens_q is not None and max_length_q is not None:
            cu, max_len = cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(max_length_q)
        else:
            if position_ids is None:
                position_ids = torch.arange(n, device=query.device).repeat(b)
            cu, max_len = boundaries(position_ids)
        dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d).to(dtype) for x in (query, key, value))
        out = kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),  # causal
                     enable_gqa=key.shape[1] != h)
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
