"""Biased Memory Normalization and the memory write, init and reset built on it (torch).

Shapes: memory / m (B, K, D); v_bias (K, D), one bias per slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memcore.backends.torch._common import half_safe
from memcore.backends.torch.attention import slot_attention

__all__ = ["NORM_EPS", "bmn", "memory_init", "memory_reset", "memory_write"]

NORM_EPS = 1e-12  # u / max(||u||, eps): F.normalize's clamp, the reference's convention


@half_safe
def bmn(m, v_bias) -> torch.Tensor:
    """Biased Memory Normalization: (m + v_bias) / max(||m + v_bias||_2, 1e-12) per slot.

    Args:
        m: (B, K, D); v_bias: (K, D).

    Returns:
        (B, K, D) rows of unit norm (zero where m + v_bias = 0).
    """
    return F.normalize(m + v_bias, p=2.0, dim=-1, eps=NORM_EPS)


@half_safe
def memory_write(
    memory, x, wq, wk, wv, v_bias, *, num_heads: int, tau: float = 0.25, token_mask=None
):
    """bmn(slot_attention(memory, x, wq, wk, wv), v_bias): (B, K, D)."""
    m = slot_attention(memory, x, wq, wk, wv, num_heads=num_heads, tau=tau, token_mask=token_mask)
    return bmn(m, v_bias)


@half_safe
def memory_init(v_bias, *, batch_size: int) -> torch.Tensor:
    """M_0 = normalize(v_bias) broadcast to (batch_size, K, D): a fresh tensor, differentiable."""
    y = F.normalize(v_bias, p=2.0, dim=-1, eps=NORM_EPS)
    # A copy, not an expanded view, so callers may write into it safely.
    return y.unsqueeze(0).expand(batch_size, *y.shape).clone()


@half_safe
def memory_reset(memory, v_bias, *, reset) -> torch.Tensor:
    """Rows b with reset[b] become normalize(v_bias); the others pass through: (B, K, D).

    Args:
        memory: (B, K, D); v_bias: (K, D); reset: (B,) bool.
    """
    m0 = F.normalize(v_bias, p=2.0, dim=-1, eps=NORM_EPS)
    flags = torch.as_tensor(reset, device=memory.device)[:, None, None]
    return torch.where(flags, m0.unsqueeze(0), memory)
