"""The SAB forward alone (no gradient), for evaluation at long T (the transfer test).

Same computation as the drivers of :mod:`.sab_model` with ``torch.no_grad``, organised for
long sequences: each memory's key ``m_j w1`` (B, A) is computed once, when it is written,
into a preallocated key bank (N_max, B, A), so a step scores its N_t memories with one
add, one tanh and one contraction with ``w3`` over the key bank (in blocks of at most
``block_elements`` elements) instead of N_t matmuls. The weights and the read follow
docs/semantics.md 3.9-3.10 (top min(k_top + 1, N) by value, relu, normalise with eps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memcore.backends.torch.cells import sab_readout
from memcore.backends.torch.sab_model import capacity, hidden, n_read, with_hidden
from memcore.config import SABConfig

__all__ = ["sab_outputs"]


def _read(keys, values, n, h_hat, w2, w3, config, block_elements) -> torch.Tensor:
    """s (B, Hd) from the first n memories (keys (N, B, A), values (N, B, Hd))."""
    if n <= 1:  # no memory, or one: every weight is 0
        return torch.zeros_like(h_hat)
    u = h_hat @ w2  # (B, A)
    rows = max(1, block_elements // (u.shape[0] * u.shape[1]))
    parts = [torch.tanh(keys[lo : min(lo + rows, n)] + u) @ w3 for lo in range(0, n, rows)]
    a = (parts[0] if len(parts) == 1 else torch.cat(parts)).t()  # (B, n)
    kth = min(config.k_top + 1, n)
    top, idx = torch.topk(a, kth, dim=-1, largest=True, sorted=True)
    z = torch.relu(top - top[:, kth - 1 : kth])
    den = z.sum(-1, keepdim=True) + config.eps
    w = z / torch.where(den > 0, den, torch.ones_like(den))
    m = values[idx, torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)]  # (B, kth, Hd)
    return (w.unsqueeze(1) @ m).squeeze(1)


@torch.no_grad()
def sab_outputs(
    cell,
    params: Mapping[str, torch.Tensor],
    xs: torch.Tensor,
    state0: Any,
    *,
    config: SABConfig,
    first: int = 0,
    readout=sab_readout,
    block_elements: int = 1 << 26,
) -> torch.Tensor:
    """y_t for t = first .. T-1 (0-based) of the SAB forward: (T - first, B, O).

    Args:
        cell, params, readout: as :func:`.sab_model.sab_loss`.
        xs: (T, B, I); state0: the cell's initial state (hidden (B, Hd) first).
        config: k_top, k_att, eps, include_h0_memory (the stop-gradient switches do not
            change the forward).
        first: the first step whose output is kept (the rest are only run).
        block_elements: the largest (n, B, A) score block built at once.
    """
    if config.scorer != "memcore" or config.sparsify != "memcore":  # issue 14.4
        from memcore.backends.torch.sab_release import sab_outputs_modes

        return sab_outputs_modes(cell, params, xs, state0, config=config, first=first,
                                 readout=readout)  # fmt: skip
    T = int(xs.shape[0])
    h0 = hidden(state0)
    N, B = capacity(T, config), int(h0.shape[0])
    w1, w2, w3 = params["w1"], params["w2"], params["w3"]
    values = h0.new_empty((N, B, h0.shape[1]))
    keys = h0.new_empty((N, B, w1.shape[1]))
    if config.include_h0_memory:
        values[0].copy_(h0)
        keys[0].copy_(h0 @ w1)
    state, ys = state0, []
    for t in range(1, T + 1):
        h_hat, state = cell(params, xs[t - 1], state)
        s = _read(keys, values, n_read(t, config), h_hat, w2, w3, config, block_elements)
        h = h_hat + s
        state = with_hidden(state, h)
        if t > first:
            ys.append(readout(params, h, s))
        if t % config.k_att == 0:
            j = n_read(t, config)
            values[j].copy_(h)
            keys[j].copy_(h @ w1)
    return torch.stack(ys)
