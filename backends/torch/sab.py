"""Sparse Attentive Backtracking retrieval in native torch ops: scores, top-k sparsifier, read.

Shapes: h_hat (B, Hd); memories (B, N, Hd); w1, w2 (Hd, A); w3 (A,); scores (B, N).

Two implementations of one retrieval:

- ``sab_scores`` / ``sparsify`` / ``sparse_retrieve``: the op, plain torch ops whose
  gradient comes from torch autograd. ``TorchBackend.vjp("sparse_retrieve", ...)`` and the
  conformance suite use these only, so the suite checks torch's own derivative against the
  reference's hand-written one (the "independence" of docs/porting.md, section 3.2).
- ``bank_retrieve`` / ``bank_write``: the SAB routing drivers' hot path (``routing.bptt``
  for "sab", ``sab_bptt``, ``sab_sparse_replay``, through ``steps.SABMemories``), a
  ``torch.autograd.Function`` with a hand-written backward. It reads a preallocated
  memory bank (N_max, B, Hd) instead of a fresh stack of the memories, and saves only
  h_hat, the top min(k_top + 1, N) indices and scores, so a step's saved state does not
  grow with N; the backward gathers those few memory rows again and adds their gradient
  into the bank's accumulator. Nothing outside the routing drivers uses it, and the
  drivers' ``retrieval="autograd"`` option runs the plain op instead (tests pin that both
  give the same results to float64 round-off).
"""

from __future__ import annotations

import torch

from memcore.backends.torch._common import half_safe

__all__ = [
    "bank_retrieve",
    "bank_write",
    "kth_largest",
    "sab_scores",
    "sparse_retrieve",
    "sparsify",
]


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


# ------------------------------------------------------------ routing drivers' hot path
# Elements of the (n, B, A) transient scored per block. 1 << 16 measured on the H200 (bench
# sab_replay, B=64, A=32): replay's memory beyond its stored memories stays flat from T=1000 to
# 5000 (1 << 18 grew 1.31x) at no measured slowdown; 1 << 14 was 1.4x slower at T=5000.
SCORE_BLOCK_ELEMENTS = 1 << 16


def _bank_scores(h_hat, values, n, w1, w2, w3) -> torch.Tensor:
    """(B, n) scores of the first n bank rows, in blocks so no (n, B, A) tensor is built."""
    u = h_hat @ w2
    rows = max(1, SCORE_BLOCK_ELEMENTS // (u.shape[0] * u.shape[1]))
    blocks = []
    for lo in range(0, n, rows):
        m = values[lo : min(lo + rows, n)]
        t = (m.reshape(-1, m.shape[-1]) @ w1).view(m.shape[0], m.shape[1], -1)
        blocks.append(torch.tanh_(t.add_(u)) @ w3)
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).t()


def _threshold_weights(top, kth: int, eps: float):
    """From the top min(k_top + 1, n) scores (B, q): (z, den, w) over those q entries."""
    z = torch.relu(top - top[:, kth - 1 : kth])
    den = z.sum(-1, keepdim=True) + eps
    den = torch.where(den > 0, den, torch.ones_like(den))  # eps = 0, every z = 0: weights 0
    return z, den, z / den


def _gather(values, idx) -> torch.Tensor:
    """(B, q, Hd): bank rows idx[b, :] of batch row b."""
    return values[idx, torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)]


def _retrieve_forward(bank, n, h_hat, w1, w2, w3, k_top, eps, keep_all):
    """s (B, Hd) and what the backward needs: (idx (B, q), top scores (B, q), ties (B, 1))."""
    a = _bank_scores(h_hat, bank.values, n, w1, w2, w3)
    kth = min(k_top + 1, n)
    # Only the top kth - 1 entries can have z > 0 (and gradient). With threshold_grad every
    # entry equal to the threshold shares its gradient (``keep_all``): keep all n, sorted.
    top, idx = torch.topk(a, n if keep_all else kth, dim=-1, largest=True, sorted=True)
    ties = (a == top[:, kth - 1 : kth]).sum(-1, keepdim=True).to(a.dtype) if keep_all else None
    _, _, w = _threshold_weights(top, kth, eps)
    s = (w.unsqueeze(1) @ _gather(bank.values, idx)).squeeze(1)
    return s, idx, top, ties


class _BankRead(torch.autograd.Function):
    """s = sparse_retrieve(h_hat, bank[:n]).s with the memories' gradient sent to the bank."""

    @staticmethod
    def forward(ctx, h_hat, w1, w2, w3, token, bank, n, config):
        s, idx, top, ties = _retrieve_forward(
            bank, n, h_hat, w1, w2, w3, config.k_top, config.eps, config.threshold_grad
        )
        ctx.bank, ctx.kth, ctx.config = bank, min(config.k_top + 1, n), config
        ctx.save_for_backward(h_hat, w1, w2, w3, idx, top, ties)
        return s

    @staticmethod
    def backward(ctx, ds):
        """docs/semantics.md 3.9-3.10 restricted to the gathered rows (the only ones with z > 0,
        or at the threshold with threshold_grad): dw_i = <m_i, ds>; dz = (dw - <dw, w>) / den;
        da = dz [z > 0] (+ d tau / |ties| on the ties); g = da w3 (1 - t^2) with
        t = tanh(m w1 + h_hat w2); dm = w ds + g w1^T (value path only when block_score_grad)."""
        h_hat, w1, w2, w3, idx, top, ties = ctx.saved_tensors
        cfg, kth = ctx.config, ctx.kth
        m = _gather(ctx.bank.values, idx)  # (B, q, Hd)
        z, den, w = _threshold_weights(top, kth, cfg.eps)
        dw = (m @ ds.unsqueeze(-1)).squeeze(-1)
        dz = (dw - (w * dw).sum(-1, keepdim=True)) / den
        da = torch.where(z > 0, dz, torch.zeros_like(dz))
        if cfg.threshold_grad:
            at_thr = (top == top[:, kth - 1 : kth]).to(da.dtype)
            da = da - at_thr * da.sum(-1, keepdim=True) / ties
        t = torch.tanh(m @ w1 + (h_hat @ w2).unsqueeze(1))  # (B, q, A)
        g = da.unsqueeze(-1) * (1 - t * t) * w3
        g_rows = g.sum(1)
        d_w1 = m.reshape(-1, m.shape[-1]).t() @ g.reshape(-1, g.shape[-1])
        d_w3 = (da.unsqueeze(-1) * t).sum((0, 1))
        dm = w.unsqueeze(-1) * ds.unsqueeze(1)
        d_h = None
        if not cfg.block_score_grad:
            dm = dm + g @ w1.t()
            d_h = g_rows @ w2.t()
        # index_add_ on the flat (N * B, Hd) accumulator: no host sync (CUDA-graph safe);
        # the (slot, row) pairs are distinct (topk indices per row), so order is irrelevant.
        flat = ctx.bank.grad.view(-1, dm.shape[-1])
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        flat.index_add_(0, (idx * idx.shape[0] + rows).reshape(-1), dm.reshape(-1, dm.shape[-1]))
        return d_h, d_w1, h_hat.t() @ g_rows, d_w3, None, None, None, None


class _BankWrite(torch.autograd.Function):
    """Writes h into bank slot j; backward adds the slot's accumulated gradient into dh.

    Its output ``token`` (a scalar) orders the backward: every later read takes the latest
    token, so all reads of slot j finish their backward before this one reads the slot.
    """

    @staticmethod
    def forward(ctx, h, token, bank, j, store):
        if store:
            bank.values[j].copy_(h)
        ctx.bank, ctx.j = bank, j
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, d_token):
        return ctx.bank.grad[ctx.j].clone(), None, None, None, None


def bank_retrieve(bank, n: int, h_hat, w1, w2, w3, token, config) -> torch.Tensor:
    """s (B, Hd): SAB retrieval over the first n bank rows (the routing drivers' hot path).

    Args:
        bank: a ``steps.SABMemories`` (``values`` (N_max, B, Hd), ``grad`` like it).
        n: memories written so far; h_hat: (B, Hd); w1, w2: (Hd, A); w3: (A,).
        token: the latest write's token (or None); config: k_top, eps, threshold_grad,
            block_score_grad.
    """
    if n <= 1:  # no memory or a single one: every weight is 0 (docs/semantics.md 3.9)
        return torch.zeros_like(h_hat)
    if not torch.is_grad_enabled():
        return _retrieve_forward(bank, n, h_hat, w1, w2, w3, config.k_top, config.eps, False)[0]
    return _BankRead.apply(h_hat, w1, w2, w3, token, bank, n, config)


def bank_write(bank, j: int, h, token, *, store: bool = True):
    """Puts h (B, Hd) in bank slot j (unless ``store`` is False); returns the new token."""
    if not torch.is_grad_enabled() or not h.requires_grad:
        if store:
            bank.values[j].copy_(h)
        return token
    return _BankWrite.apply(h, token, bank, j, store)
