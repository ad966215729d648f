"""Memformer memory reading and slot-attention writing in native torch ops.

Shapes: x (B, L, D) tokens; memory (B, K, D) slots; projections (D, D); H heads, dh = D / H.
Gradients come from torch autograd, never from the reference's hand-written backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memcore.backends.torch._common import half_safe, merge_heads, split_heads

__all__ = ["memory_read", "slot_attention"]


@half_safe
def memory_read(x, memory, wq, wk, wv, wo, *, num_heads: int) -> torch.Tensor:
    """Cross-attention from tokens to memory slots (Memformer Eq. 1-3).

    Args:
        x: (B, L, D) tokens (queries); memory: (B, K, D) slots (keys and values).
        wq, wk, wv, wo: (D, D) projections, no biases.
        num_heads: H, dividing D.

    Returns:
        (B, L, D): concat_h(softmax(q_h k_h^T / sqrt(dh)) v_h) wo.
    """
    scale = 1.0 / math.sqrt(x.shape[-1] // num_heads)
    q = split_heads(x @ wq, num_heads)
    k = split_heads(memory @ wk, num_heads)
    v = split_heads(memory @ wv, num_heads)
    # The fused kernel subtracts the row max like the reference; every row has K >= 1 keys.
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return merge_heads(o) @ wo


@half_safe
def slot_attention(
    memory, x, wq, wk, wv, *, num_heads: int, tau: float = 0.25, token_mask=None
) -> torch.Tensor:
    """Slot attention write (Memformer Eq. 4-8): each slot attends to [itself; tokens].

    Args:
        memory: (B, K, D) slots; x: (B, L, D) tokens; wq, wk, wv: (D, D).
        num_heads: H; tau: temperature in (0, 1]; token_mask: (B, L) bool or None.

    Returns:
        (B, K, D): per head a_self * m_i + sum_j a_j vx_j with
        a = softmax([<q_i, k_i>, <q_i, kx_j>] / (sqrt(dh) tau)); masked tokens get weight 0.
    """
    scale = 1.0 / (math.sqrt(memory.shape[-1] // num_heads) * tau)
    q = split_heads(memory @ wq, num_heads)
    ks = split_heads(memory @ wk, num_heads)
    kx = split_heads(x @ wk, num_heads)
    vx = split_heads(x @ wv, num_heads)
    ms = split_heads(memory, num_heads)
    s_self = (q * ks).sum(-1, keepdim=True) * scale  # (B, H, K, 1)
    s_tok = (q @ kx.transpose(-1, -2)) * scale  # (B, H, K, L)
    if token_mask is not None:
        keep = torch.as_tensor(token_mask, device=memory.device)[:, None, None, :]
        # Masked logits are -inf: exp gives exactly 0 weight and softmax's backward exactly 0
        # gradient; the self entry is never masked, so every row keeps a finite max.
        s_tok = s_tok.masked_fill(~keep, -math.inf)
    # torch.softmax subtracts the row max: logits / tau stay finite for tau down to 1e-3.
    a = torch.softmax(torch.cat([s_self, s_tok], dim=-1), dim=-1)
    out = a[..., :1] * ms + a[..., 1:] @ vx
    return merge_heads(out)
