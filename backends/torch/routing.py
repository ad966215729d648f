"""Gradient routing in torch: BPTT, MRBP (Memformer Alg. 1) and SAB sparse replay.

Every driver follows the routing contract of ``docs/semantics.md`` and returns a
:class:`memcore.routing_types.RoutingResult`. Gradients come from torch autograd, except
one piece of the SAB drivers (``bptt("sab")``, ``sab_bptt``, ``sab_sparse_replay``): with
``retrieval="fast"`` (the default) their sparse retrieval reads a preallocated memory bank
through a custom autograd Function with a hand-written backward (``sab.bank_retrieve``),
so a step neither copies nor saves all N memories; ``retrieval="autograd"`` runs the plain
``sparse_retrieve`` op on stacked memories instead, and the tests pin both to the same
results. The op's own VJP (``TorchBackend.vjp("sparse_retrieve", ...)``) is always autograd.

Memory accounting (``peak_cache_bytes``) is described in :mod:`.accounting`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memcore.backends.torch import cells, sab_model
from memcore.backends.torch.accounting import SavedBytes, held_tensors
from memcore.backends.torch.stash import MemoryStash
from memcore.backends.torch.steps import loss_weight, memformer_step, step_loss
from memcore.backends.torch.validate import check_memformer, check_sab
from memcore.errors import MemcoreError
from memcore.routing_types import Loss, RoutingResult

__all__ = ["bptt", "mrbp", "mrbp_accumulate", "sab_bptt", "sab_sparse_replay"]


def _leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaves sharing storage with ``params``: the caller's tensors are never touched."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def _grads(leaves: Mapping[str, torch.Tensor], grads: Sequence[Any]) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros_like(v) if g is None else g.detach()
        for (k, v), g in zip(leaves.items(), grads)
    }


def _zero_if_none(g: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.detach()


# ---------------------------------------------------------------------- Memformer
def _memformer_loss(P, xs, M, targets, config, loss, resets, token_mask, truncate_every):
    """Whole-graph forward: (L, M_T)."""
    total = xs.new_zeros(())
    for t in range(xs.shape[0]):
        if truncate_every is not None and t > 0 and t % truncate_every == 0:
            M = M.detach()  # stop-gradient on M_t, before its reset (the contract's cut)
        M, y = memformer_step(
            P,
            xs[t],
            M,
            config=config,
            reset=None if resets is None else resets[t],
            token_mask=None if token_mask is None else token_mask[t],
        )
        total = total + loss_weight(loss.weights, t) * step_loss(y, targets[t], loss.kind, P)
    return total, M


def _bptt_memformer(params, xs, M0, targets, *, config, loss, resets, token_mask, truncate_every):
    check_memformer(
        params,
        xs,
        M0,
        targets,
        config=config,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
    )
    P = _leaves(params)
    M0_leaf = M0.detach().requires_grad_(True)
    with (
        torch.enable_grad(),
        SavedBytes(held_tensors(params, xs, targets, resets, token_mask)) as saved,
    ):
        total, M_T = _memformer_loss(
            P, xs, M0_leaf, targets, config, loss, resets, token_mask, truncate_every
        )
        grads = torch.autograd.grad(total, list(P.values()) + [M0_leaf], allow_unused=True)
    return RoutingResult(
        loss=float(total.detach()),
        grads=_grads(P, grads[:-1]),
        d_state0=_zero_if_none(grads[-1], M0),
        final_state=M_T.detach(),
        peak_cache_bytes=saved.total,
    )


def mrbp_accumulate(
    P,
    xs,
    M0,
    targets,
    *,
    config,
    loss=Loss(),
    resets=None,
    token_mask=None,
    truncate_every=None,
    stash="device",
):
    """Memformer Alg. 1 on leaves ``P`` that require grad: their ``.grad`` accumulates dL/dP.

    A no-grad forward keeps only M_0..M_T; then for t = T-1..0 step t is recomputed from
    M_t and ``torch.autograd.backward`` sends (weight_t dl_t, dM_{t+1}) through it, so at
    most one step's graph exists at a time. Inputs are assumed validated. ``stash``: where
    M_0..M_{T-1} wait (:class:`~memcore.backends.torch.stash.MemoryStash`); the accounting
    counts their bytes wherever they are.

    Returns:
        (L as float, dM_0 (B, K, D), M_T (B, K, D), peak_cache_bytes).
    """
    T = xs.shape[0]

    def run(t: int, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        M_next, y = memformer_step(
            P,
            xs[t],
            M,
            config=config,
            reset=None if resets is None else resets[t],
            token_mask=None if token_mask is None else token_mask[t],
        )
        return M_next, loss_weight(loss.weights, t) * step_loss(y, targets[t], loss.kind, P)

    total = xs.new_zeros((), dtype=torch.float64)
    memories = MemoryStash(stash)
    M = M0.detach()
    with torch.no_grad():
        for t in range(T):
            memories.push(M)
            M, l_t = run(t, M)
            total += l_t
    M_T = M
    stored = (T + 1) * M_T.nbytes
    held = [*held_tensors(P, xs, targets, resets, token_mask), M0, M_T]
    d_memory: torch.Tensor | None = None
    step_peak = 0
    for t in reversed(range(T)):
        M_in = memories.pop().requires_grad_(True)
        with torch.enable_grad(), SavedBytes([*held, M_in]) as saved:
            M_next, l_t = run(t, M_in)
            outs, cts = [l_t], [torch.ones_like(l_t)]
            if d_memory is not None:
                outs.append(M_next)
                cts.append(d_memory)
            torch.autograd.backward(outs, cts)
        step_peak = max(step_peak, saved.total)
        d_memory = M_in.grad
        if truncate_every is not None and t > 0 and t % truncate_every == 0:
            d_memory = None  # stop-gradient on M_t: step t-1 gets no memory gradient
    d0 = torch.zeros_like(M0) if d_memory is None else d_memory.detach()
    return float(total), d0, M_T, stored + step_peak


def _mrbp(params, xs, M0, targets, *, config, loss, resets, token_mask, truncate_every):
    check_memformer(
        params,
        xs,
        M0,
        targets,
        config=config,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
        memory_arg="M0",
    )
    P = _leaves(params)
    total, d0, M_T, peak = mrbp_accumulate(
        P,
        xs,
        M0,
        targets,
        config=config,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
    )
    return RoutingResult(
        loss=total,
        grads={k: _zero_if_none(v.grad, v) for k, v in P.items()},
        d_state0=d0,
        final_state=M_T,
        peak_cache_bytes=peak,
    )


def mrbp(
    params,
    xs,
    M0,
    targets,
    *,
    config,
    loss=Loss(),
    resets=None,
    token_mask=None,
    truncate_every=None,
) -> RoutingResult:
    """Memory Replay Back-Propagation (Memformer Alg. 1) with per-step autograd.backward.

    Args:
        params: MEMFORMER_PARAMS (+ head_w for xent) tensors; xs: (T, B, L, D); M0: (B, K, D).
        targets: (T, B, L, D) float (mse) or (T, B, L) class ids (xent).
        config: memcore.MemoryConfig; loss: memcore.routing_types.Loss.
        resets: (T, B) bool or None; token_mask: (T, B, L) bool or None.
        truncate_every: k: stop-gradient on M_t entering step t when t % k == 0, t > 0.

    Returns:
        RoutingResult with d_state0 = dM_0 and final_state = M_T, equal to BPTT's.
    """
    kw = dict(config=config, loss=loss, resets=resets, token_mask=token_mask)
    return _mrbp(params, xs, M0, targets, truncate_every=truncate_every, **kw)


# ---------------------------------------------------------------------- SAB
# The SAB drivers are memcore's LSTM cell under the cell-generic drivers of .sab_model.
def _sab_whole(params, xs, state0, targets, *, config, loss, truncate, retrieval):
    check_sab(params, xs, state0, targets, config=config, loss=loss)
    return sab_model.sab_bptt(
        cells.lstm, params, xs, tuple(state0), targets, config=config, loss=loss,
        truncate=truncate, retrieval=retrieval, check=False,
    )  # fmt: skip


def bptt(
    step: str,
    params,
    xs,
    state0,
    targets,
    *,
    config,
    loss=Loss(),
    resets=None,
    token_mask=None,
    truncate_every=None,
    retrieval="fast",
) -> RoutingResult:
    """Full BPTT: every step kept, one reverse sweep: the exact gradient of the forward graph.

    Args:
        step: "memformer" (state0 = M_0 (B, K, D)) or "sab" (state0 = (h0, c0), no chunk cuts;
            the step's own stop-gradients from threshold_grad / block_score_grad remain).
        resets, token_mask, truncate_every: memformer only (see :func:`mrbp`).
        retrieval: sab only: "fast" (memory bank, hand-written retrieval backward) or
            "autograd" (the plain op on stacked memories); equal results.
    """
    if step == "memformer":
        kw = dict(config=config, loss=loss, resets=resets, token_mask=token_mask)
        return _bptt_memformer(params, xs, state0, targets, truncate_every=truncate_every, **kw)
    if step == "sab":
        for name, value in (
            ("resets", resets),
            ("token_mask", token_mask),
            ("truncate_every", truncate_every),
        ):
            if value is not None:
                raise MemcoreError(
                    f"`{name}` must be None for step 'sab'. "
                    f"Received: {name} of type {type(value).__name__}"
                )
        kw = dict(config=config, loss=loss, truncate=False, retrieval=retrieval)
        return _sab_whole(params, xs, state0, targets, **kw)
    raise MemcoreError(f"`step` must be one of 'memformer', 'sab'. Received: step={step!r}")


def sab_bptt(params, xs, state0, targets, *, config, loss=Loss(), retrieval="fast"):
    """SAB with chunked truncation ((h, c) cut entering t = 1 + m k_trunc), whole graph kept.

    Args:
        params: SAB_PARAMS (+ head_w for xent); xs: (T, B, I); state0: (h0, c0), each (B, Hd).
        targets: (T, B, O) float (mse) or (T, B) class ids (xent); config: memcore.SABConfig.
        retrieval: "fast" or "autograd" (see :func:`bptt`).
    """
    return _sab_whole(
        params, xs, state0, targets, config=config, loss=loss, truncate=True, retrieval=retrieval
    )


def sab_sparse_replay(
    params, xs, state0, targets, *, config, loss=Loss(), retrieval="fast"
) -> RoutingResult:
    """The gradient of :func:`sab_bptt` keeping only chunk-boundary states and memory vectors.

    :func:`.sab_model.sab_sparse_replay` with memcore's LSTM cell: a no-grad forward stores
    (h, c) entering each chunk and every memory vector (in one (N_max, B, Hd) bank; a
    boundary h that is also a memory is a view of it); chunks are replayed last to first,
    each back-propagating its weighted losses plus the gradient later chunks accumulated
    for the memories it wrote. A chunk with no non-zero loss weight and no memory with
    non-zero gradient is skipped. ``replayed_chunks`` lists the replayed 0-based chunk
    indices in replay order (descending). ``retrieval``: see :func:`bptt`.
    """
    check_sab(params, xs, state0, targets, config=config, loss=loss)
    return sab_model.sab_sparse_replay(
        cells.lstm, params, xs, tuple(state0), targets, config=config, loss=loss,
        retrieval=retrieval, check=False,
    )  # fmt: skip
