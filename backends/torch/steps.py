"""The recurrent units routing works on, as differentiable torch functions, and the losses.

``memformer_step`` (the smallest real Memformer memory cell) and ``sab_step`` (the
SAB-augmented LSTM, SAB Alg. 1) are plain forward functions: autograd supplies their
backward. Parameter names are :data:`memcore.routing_types.MEMFORMER_PARAMS` and
:data:`memcore.routing_types.SAB_PARAMS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from memcore.backends.torch.attention import memory_read
from memcore.backends.torch.lstm import lstm_cell
from memcore.backends.torch.memory import memory_reset, memory_write
from memcore.backends.torch.sab import sparse_retrieve
from memcore.config import MemoryConfig, SABConfig
from memcore.routing_types import HEAD_PARAM

__all__ = ["loss_weight", "memformer_step", "sab_step", "stack_memories", "step_loss"]


def memformer_step(
    params: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    memory: torch.Tensor,
    *,
    config: MemoryConfig,
    reset: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Memformer step: r = read(x_t, M), h = x_t + r, y_t = h, M' = write(M, h).

    Args:
        params: the MEMFORMER_PARAMS tensors ((D, D) projections, v_bias (K, D)).
        x_t: (B, L, D) tokens; memory: (B, K, D), M_t before the reset.
        config: K, D, H, tau.
        reset: (B,) bool or None: flagged rows of M_t become the initial memory first.
        token_mask: (B, L) bool or None, used by the write only.

    Returns:
        (M_{t+1} (B, K, D), y_t (B, L, D)).
    """
    p = params
    if reset is not None:
        memory = memory_reset(memory, p["v_bias"], reset=reset)
    r = memory_read(
        x_t, memory, p["read_wq"], p["read_wk"], p["read_wv"], p["read_wo"], num_heads=config.heads
    )
    h = x_t + r
    new_memory = memory_write(
        memory,
        h,
        p["write_wq"],
        p["write_wk"],
        p["write_wv"],
        p["v_bias"],
        num_heads=config.heads,
        tau=config.tau,
        token_mask=token_mask,
    )
    return new_memory, h


def stack_memories(memories: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B, N, Hd) from N tensors (B, Hd); an empty (B, 0, Hd) when there are none."""
    if not memories:
        return like.new_zeros((like.shape[0], 0, like.shape[-1]))
    return torch.stack(list(memories), dim=1)


def sab_step(
    params: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    memories: torch.Tensor,
    *,
    config: SABConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SAB step (SAB Alg. 1): LSTM, sparse retrieval, h = h_hat + s, readout.

    Args:
        params: the SAB_PARAMS tensors.
        x_t: (B, I); h, c: (B, Hd) entering the step; memories: (B, N, Hd).
        config: k_top, eps, threshold_grad, block_score_grad.

    Returns:
        (h (B, Hd), c (B, Hd), y_t (B, O) = h v1 + s v2 + b_y, weights (B, N)).
        Appending h to the memories is the caller's business (it knows t and k_att).
    """
    p = params
    h_hat, c = lstm_cell(x_t, h, c, p["lstm_w"], p["lstm_b"])
    s, w = sparse_retrieve(
        h_hat,
        memories,
        p["w1"],
        p["w2"],
        p["w3"],
        k_top=config.k_top,
        eps=config.eps,
        threshold_grad=config.threshold_grad,
        block_score_grad=config.block_score_grad,
    )
    h = h_hat + s
    y = h @ p["v1"] + s @ p["v2"] + p["b_y"]
    return h, c, y, w


def step_loss(
    y: torch.Tensor, target: torch.Tensor, kind: str, params: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """l_t: mean squared error over all elements, or mean softmax cross-entropy over positions.

    Args:
        y: (..., Dy) step output; target: like y (mse) or (...) integer class ids (xent).
        kind: "mse" or "xent" (logits = y @ params["head_w"], head_w (Dy, C)).
    """
    if kind == "mse":
        return ((y - target) ** 2).mean()
    logits = y @ params[HEAD_PARAM]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long())


def loss_weight(weights: Sequence[float] | None, t: int) -> float:
    """weight_t (1.0 when no weights are given)."""
    return 1.0 if weights is None else float(weights[t])
