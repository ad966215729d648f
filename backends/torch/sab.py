"""Sparse Attentive Backtracking retrieval in native torch ops: scores, top-k sparsifier, read.

Shapes: h_hat (B, Hd); memories (B, N, Hd); w1, w2 (Hd, A); w3 (A,); scores (B, N).
"""

from __future__ import annotations

import torch

from memcore.backends.torch._common import half_safe

__all__ = ["kth_largest", "sab_scores", "sparse_retrieve", "sparsify"]


@half_safe
def sab_scores(h_hat, memories, w1, w2, w3) -> torch.Tensor:
    """a_i = w3 . tanh(m_i w1 + h_hat w2) (SAB Alg. 1 lines 4-5; no biases): (B, N)."""
    t = torch.tanh(memories @ w1 + (h_hat @ w2).unsqueeze(1))
    return t @ w3


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 1): the k-th largest entry of each row by value (1 <= k <= N), no gradient."""
    return torch.topk(scores.detach(), k, dim=-1, largest=True, sorted=True).values[:, k - 1 : k]


@half_safe
def sparsify(
    scores, *, k_top: int, eps: float = 1e-7, threshold_grad: bool = False
) -> torch.Tensor:
    """Top-k sparsifier (SAB Alg. 1 line 6), per row.

    tau_row = the min(k_top + 1, N)-th largest score (by value, so ties change nothing);
    z = relu(a - tau_row) (torch's relu has derivative 0 at 0, so entries equal to the
    threshold get weight 0 and no gradient); w = z / (sum z + eps). N = 0 gives (B, 0).

    Args:
        scores: (B, N).
        k_top: memories that can get weight; eps: normalizer offset.
        threshold_grad: let gradient flow through tau_row. At a tie it is split equally
            among the entries equal to the threshold.

    Returns:
        (B, N) weights.
    """
    n = scores.shape[-1]
    if n == 0:
        return scores * 0.0
    thr = kth_largest(scores, min(k_top + 1, n))
    if threshold_grad:
        # d thr / d a_i = [a_i == thr] / #ties, added as (m - m.detach()) so the forward
        # value stays exactly thr (a mean of equal floats can round away from them).
        ties = (scores.detach() == thr).to(scores.dtype)
        mean_tie = (scores * ties).sum(-1, keepdim=True) / ties.sum(-1, keepdim=True)
        thr = thr + (mean_tie - mean_tie.detach())
    z = torch.relu(scores - thr)
    denom = z.sum(-1, keepdim=True) + eps
    # Only eps = 0 with every z = 0 gives a zero denominator; the weights are then 0.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return z / denom


@half_safe
def sparse_retrieve(
    h_hat,
    memories,
    w1,
    w2,
    w3,
    *,
    k_top: int,
    eps: float = 1e-7,
    threshold_grad: bool = False,
    block_score_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = sum_i w_i m_i with w = sparsify(sab_scores(h_hat, memories)).

    Args:
        h_hat: (B, Hd); memories: (B, N, Hd); w1, w2: (Hd, A); w3: (A,).
        block_score_grad: stop gradient from the scorer into h_hat and the memories
            (the scorer's own weights still get theirs; the release's block_attn_grad_past).

    Returns:
        (s (B, Hd), weights (B, N)).
    """
    if block_score_grad:
        a = sab_scores(h_hat.detach(), memories.detach(), w1, w2, w3)
    else:
        a = sab_scores(h_hat, memories, w1, w2, w3)
    w = sparsify(a, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    s = (w.unsqueeze(1) @ memories).squeeze(1)
    return s, w
