"""Memformer memory reading and slot-attention writing in native torch ops.

Shapes: x (B, L, D) tokens; memory (B, K, D) slots; projections (D, D); H heads, dh = D / H.
Gradients come from torch autograd, never from the reference's hand-written backward.
"""

from __future__ import annotations

import math

import torch

from memcore.backends.torch._common import half_safe, merge_heads, split_heads

__all__ = ["memory_read", "scaled_softmax", "slot_attention"]


def scaled_softmax(s: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * s) over the last axis, as (s - max s) * scale (docs/semantics.md §2).

    The max is subtracted before the scale multiplies: every scaled logit is then <= 0
    (the row's max exactly 0), so no tau in the allowed range (1/tau up to 2**126) can
    overflow, where scale * s first would give inf - inf = NaN. The max is detached (a
    constant shift: softmax's gradient does not depend on it).
    """
    shifted = (s - s.amax(dim=-1, keepdim=True).detach()) * scale
    return torch.softmax(shifted, dim=-1)


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
    # An explicit softmax, not F.scaled_dot_product_attention: SDPA's backward recomputes
    # P = exp(S - logsumexp), and with logits of size |S| the float32 logsumexp carries an
    # absolute error ~ 1e-7 |S|, so at input scale 1e2-1e4 the gradients lost all accuracy
    # (error relative to the largest entry up to 1e1). Autograd of softmax keeps P itself,
    # as the reference does; P is only (B, H, L, K), K the few memory slots.
    p = scaled_softmax(q @ k.transpose(-1, -2), scale)
    return merge_heads(p @ v) @ wo


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
    s_self = (q * ks).sum(-1, keepdim=True)  # (B, H, K, 1)
    s_tok = q @ kx.transpose(-1, -2)  # (B, H, K, L)
    if token_mask is not None:
        keep = torch.as_tensor(token_mask, device=memory.device)[:, None, None, :]
        # Masked logits are -inf: exp gives exactly 0 weight and softmax's backward exactly 0
        # gradient; the self entry is never masked, so every row keeps a finite max.
        s_tok = s_tok.masked_fill(~keep, -math.inf)
    a = scaled_softmax(torch.cat([s_self, s_tok], dim=-1), scale)
    out = a[..., :1] * ms + a[..., 1:] @ vx
    return merge_heads(out)
