"""Release-compatible SAB retrieval in torch (issue 14.4; docs/semantics.md,
"Release-compatible mode"), plugged into the cell drivers of :mod:`.sab_model` through
``sab_core.retrieval_for`` whenever ``config.scorer`` or ``config.sparsify`` is "release".

* :func:`release_scores`: ``a_i = w_score . tanh([h_hat; m_i])``, w_score (2 Hd,).
* :func:`release_sparsify`: threshold = the k_top-th largest + eps, taken from a **stable**
  descending ``torch.sort`` (``torch.topk`` has no defined tie order), so at a tie all of
  the threshold's gradient goes to the lowest tied index at position k_top, as in the
  reference; raw scores when N <= k_top.
* :func:`retrieve`: the read with the config's scorer and sparsifier, by autograd
  (no bank backward of its own: ``Retrieval.fast`` is False).
* :func:`sab_outputs_modes`: the no-gradient forward for long-T evaluation in any mode,
  with per-memory keys stored at the write (release scorer: one number per memory).

Shapes: h_hat (B, Hd); memories (B, N, Hd); scores, weights (B, N).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from memcore.backends.torch.sab import sab_scores, sparsify

__all__ = ["release_scores", "release_sparsify", "retrieve", "sab_outputs_modes"]


def release_scores(h_hat: torch.Tensor, memories: torch.Tensor, w_score: torch.Tensor):
    """(B, N): tanh(h_hat) . w_score[:Hd] + tanh(m_i) . w_score[Hd:]."""
    hd = h_hat.shape[-1]
    return torch.tanh(memories) @ w_score[hd:] + (torch.tanh(h_hat) @ w_score[:hd]).unsqueeze(1)


def release_sparsify(scores: torch.Tensor, *, k_top: int, eps: float, threshold_grad: bool):
    """The release's sparsifier (see the module docstring): (B, N) weights."""
    n = scores.shape[-1]
    if n <= k_top:
        return scores
    # Column k_top - 1 of a stable descending sort: its gradient goes to that one index.
    kth = torch.sort(scores, dim=-1, descending=True, stable=True).values[:, k_top - 1 : k_top]
    thr = (kth if threshold_grad else kth.detach()) + eps
    z = torch.relu(scores - thr)
    denom = z.sum(-1, keepdim=True) + eps
    return z / torch.where(denom > 0, denom, torch.ones_like(denom))


def _scores(h_hat, memories, params, config) -> torch.Tensor:
    if config.block_score_grad:
        h_hat, memories = h_hat.detach(), memories.detach()
    if config.scorer == "release":
        return release_scores(h_hat, memories, params["w_score"])
    return sab_scores(h_hat, memories, params["w1"], params["w2"], params["w3"])


def _weights(a: torch.Tensor, config) -> torch.Tensor:
    kw = {"k_top": config.k_top, "eps": config.eps, "threshold_grad": config.threshold_grad}
    return release_sparsify(a, **kw) if config.sparsify == "release" else sparsify(a, **kw)


def retrieve(h_hat, memories, params: Mapping[str, torch.Tensor], config) -> torch.Tensor:
    """s (B, Hd) = sum_i w_i m_i with ``config``'s scorer and sparsifier (autograd)."""
    w = _weights(_scores(h_hat, memories, params, config), config)
    return (w.unsqueeze(1) @ memories).squeeze(1)


# ----------------------------------------------------------------------------- evaluation
def _key(params, m: torch.Tensor, config) -> torch.Tensor:
    if config.scorer == "release":
        hd = m.shape[-1]
        return (torch.tanh(m) @ params["w_score"][hd:]).unsqueeze(-1)  # (B, 1)
    return m @ params["w1"]  # (B, A)


def _score(params, h_hat, keys: torch.Tensor, config) -> torch.Tensor:
    """(B, n) from keys (n, B, Ak)."""
    if config.scorer == "release":
        hd = h_hat.shape[-1]
        return keys[..., 0].t() + (torch.tanh(h_hat) @ params["w_score"][:hd]).unsqueeze(1)
    return (torch.tanh(keys + h_hat @ params["w2"]) @ params["w3"]).t()


@torch.no_grad()
def sab_outputs_modes(cell, params, xs, state0, *, config, first=0, readout=None) -> torch.Tensor:
    """y_t for t = first .. T-1 (0-based) of the SAB forward in ``config``'s mode:
    (T - first, B, O). Reads gather only the best min(k_top + 1, n) memories by value (the
    rest have weight 0 in both sparsifiers; raw scores only occur for n <= k_top)."""
    from memcore.backends.torch.cells import sab_readout
    from memcore.backends.torch.sab_core import capacity, hidden, n_read, with_hidden

    readout = readout or sab_readout
    T, h0 = int(xs.shape[0]), hidden(state0)
    N, B = capacity(T, config), int(h0.shape[0])
    values = h0.new_empty((N, B, h0.shape[1]))
    k0 = _key(params, h0, config)
    keys = h0.new_empty((N, B, k0.shape[-1]))
    if config.include_h0_memory:
        values[0].copy_(h0)
        keys[0].copy_(k0)
    rows = torch.arange(B, device=h0.device).unsqueeze(1)
    state, ys = state0, []
    for t in range(1, T + 1):
        h_hat, state = cell(params, xs[t - 1], state)
        n = n_read(t, config)
        s = torch.zeros_like(h_hat)
        if n:
            a = _score(params, h_hat, keys[:n], config)
            k = min(config.k_top + 1, n)
            top, idx = torch.topk(a, k, dim=-1, sorted=True)
            # n > k: both thresholds (the k_top-th or (k_top+1)-th largest) lie in ``top``.
            w = _weights(top, config) if n > k else _weights(a, config)[rows, idx]
            s = (w.unsqueeze(1) @ values[idx, rows]).squeeze(1)
        h = h_hat + s
        state = with_hidden(state, h)
        if t > first:
            ys.append(readout(params, h, s))
        if t % config.k_att == 0:
            j = n_read(t, config)
            values[j].copy_(h)
            keys[j].copy_(_key(params, h, config))
    return torch.stack(ys)
