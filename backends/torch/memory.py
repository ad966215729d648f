"""Biased Memory Normalization and the memory write, init and reset built on it (torch).

Shapes: memory / m (B, K, D); v_bias (K, D), one bias per slot.
"""

from __future__ import annotations

import torch

from memcore.backends.torch._common import half_safe
from memcore.backends.torch.attention import slot_attention

__all__ = ["NORM_EPS", "bmn", "memory_init", "memory_reset", "memory_write", "normalize"]

NORM_EPS = 1e-12  # u / max(||u||, eps): F.normalize's clamp, the reference's convention


def normalize(u: torch.Tensor) -> torch.Tensor:
    """u / max(||u||_2, 1e-12) over the last axis, without overflow, gradients finite.

    The norm is taken of u / max|u| and scaled back (docs/semantics.md §3.3): u * u alone
    overflows float32 for rows of norm ~1e19 and F.normalize then returned 0. The row max
    is detached, since ||u|| = a ||u / a|| for every a > 0. Where ||u|| <= eps the
    denominator is the constant eps (gradient dy / eps), and the square root only sees a
    positive argument, so a zero row has no NaN in its gradient.
    """
    if u.shape[-1] == 0:
        return u / 1.0
    a = u.detach().abs().amax(dim=-1, keepdim=True)
    a = torch.where(a > 0, a, torch.ones_like(a))
    sq = ((u / a) ** 2).sum(dim=-1, keepdim=True)
    positive = sq > 0
    n = a * torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    n = torch.where(positive & (n > NORM_EPS), n, torch.full_like(n, NORM_EPS))
    return u / n


@half_safe
def bmn(m, v_bias) -> torch.Tensor:
    """Biased Memory Normalization: (m + v_bias) / max(||m + v_bias||_2, 1e-12) per slot.

    Args:
        m: (B, K, D); v_bias: (K, D).

    Returns:
        (B, K, D) rows of unit norm (zero where m + v_bias = 0).
    """
    return normalize(m + v_bias)


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
    y = normalize(v_bias)
    # A copy, not an expanded view, so callers may write into it safely.
    return y.unsqueeze(0).expand(batch_size, *y.shape).clone()


@half_safe
def memory_reset(memory, v_bias, *, reset) -> torch.Tensor:
    """Rows b with reset[b] become normalize(v_bias); the others pass through: (B, K, D).

    Args:
        memory: (B, K, D); v_bias: (K, D); reset: (B,) bool.
    """
    m0 = normalize(v_bias)
    flags = torch.as_tensor(reset, device=memory.device)[:, None, None]
    return torch.where(flags, m0.unsqueeze(0), memory)
