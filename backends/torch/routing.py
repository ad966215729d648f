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

from memcore.backends.torch.accounting import SavedBytes, held_tensors, nbytes_of
from memcore.backends.torch.stash import MemoryStash
from memcore.backends.torch.steps import (
    SABMemories,
    loss_weight,
    memformer_step,
    sab_bank_step,
    step_loss,
)
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
def _reads(t: int, config) -> int:
    """N_t, the memories step t reads; also the slot step t writes when t % k_att == 0."""
    return int(config.include_h0_memory) + (t - 1) // config.k_att


def _sab_graph(P, xs, h, c, targets, config, loss, truncate, retrieval):
    """Whole-graph SAB forward: (L, h_T, c_T, memories); ``truncate`` applies the k_trunc cuts."""
    T = xs.shape[0]
    mem = SABMemories(_reads(T + 1, config), h, retrieval)
    mem.track()
    if config.include_h0_memory:
        mem.write(0, h)
    total = xs.new_zeros(())
    for t in range(1, T + 1):
        if truncate and t > 1 and (t - 1) % config.k_trunc == 0:
            h, c = h.detach(), c.detach()
        h, c, y = sab_bank_step(P, xs[t - 1], h, c, mem, _reads(t, config), config=config)
        total = total + loss_weight(loss.weights, t - 1) * step_loss(
            y, targets[t - 1], loss.kind, P
        )
        if t % config.k_att == 0:
            mem.write(_reads(t, config), h)
    return total, h, c, mem


def _sab_whole(params, xs, state0, targets, *, config, loss, truncate, retrieval):
    check_sab(params, xs, state0, targets, config=config, loss=loss)
    P = _leaves(params)
    h0, c0 = (s.detach().requires_grad_(True) for s in state0)
    with torch.enable_grad(), SavedBytes(held_tensors(params, xs, targets)) as saved:
        total, h, c, mem = _sab_graph(P, xs, h0, c0, targets, config, loss, truncate, retrieval)
        outs, cts = mem.roots()
        grads = torch.autograd.grad(
            [total] + outs,
            list(P.values()) + [h0, c0],
            [torch.ones_like(total)] + cts,
            allow_unused=True,
        )
    return RoutingResult(
        loss=float(total.detach()),
        grads=_grads(P, grads[:-2]),
        d_state0=(_zero_if_none(grads[-2], h0), _zero_if_none(grads[-1], c0)),
        final_state=(h.detach(), c.detach()),
        peak_cache_bytes=saved.total + nbytes_of([mem.values]),  # saved tensors + the bank
    )


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

    A no-grad forward stores (h, c) entering each chunk and every memory vector (in one
    (N_max, B, Hd) bank; a boundary h that is also a memory is a view of it). Chunks are
    then replayed last to first: chunk c is recomputed from its boundary state reading the
    stored memories, and back-propagates its weighted losses plus the gradient that later
    chunks accumulated for the memories it wrote; its reads add gradient into the
    accumulator of the memories they read. A chunk with no non-zero loss weight and no
    memory with non-zero gradient is skipped. Loss weights decide on the host; only a
    chunk without loss looks at the accumulator, one device check for a run of such
    chunks until one of them is replayed. ``replayed_chunks`` lists the replayed 0-based
    chunk indices in replay order (descending). ``retrieval``: see :func:`bptt`.
    """
    check_sab(params, xs, state0, targets, config=config, loss=loss)
    cfg, T, kt = config, int(xs.shape[0]), config.k_trunc
    P = _leaves(params)
    boundary: list[tuple[torch.Tensor, torch.Tensor]] = []
    h, c = (s.detach() for s in state0)
    mem = SABMemories(_reads(T + 1, cfg), h, retrieval)
    if cfg.include_h0_memory:
        mem.write(0, h)
    total = xs.new_zeros((), dtype=torch.float64)
    with torch.no_grad():
        for t in range(1, T + 1):
            if (t - 1) % kt == 0:
                boundary.append((h, c))
            h, c, y = sab_bank_step(P, xs[t - 1], h, c, mem, _reads(t, cfg), config=cfg)
            total += loss_weight(loss.weights, t - 1) * step_loss(y, targets[t - 1], loss.kind, P)
            if t % cfg.k_att == 0:
                mem.write(_reads(t, cfg), h)
                h = mem.values[_reads(t, cfg)]  # the next boundary h shares the bank
    final = (h.clone(), c)
    stored_tensors = [s for pair in boundary for s in pair] + [mem.values]
    stored = nbytes_of(stored_tensors)
    held = held_tensors(P, xs, targets) + stored_tensors
    d_h0 = d_c0 = flags = None
    replayed: list[int] = []
    chunk_peak = 0
    for chunk in reversed(range(len(boundary))):
        first, last = chunk * kt + 1, min((chunk + 1) * kt, T)
        lo, hi = _reads(first, cfg), _reads(last + 1, cfg)  # the slots this chunk writes
        if not any(loss_weight(loss.weights, t - 1) != 0.0 for t in range(first, last + 1)):
            if lo == hi or not replayed:
                continue  # nothing can have sent gradient into this chunk
            if flags is None:  # valid for every chunk down to the next replay
                flags = mem.grad[:hi].ne(0).flatten(1).any(1).tolist()
            if not any(flags[lo:hi]):
                continue
        flags = None
        replayed.append(chunk)
        mem.begin_chunk(lo)
        h, c = (s.detach().requires_grad_(chunk == 0) for s in boundary[chunk])
        h_in, c_in = h, c
        with torch.enable_grad(), SavedBytes(held) as saved:
            l_chunk = xs.new_zeros(())
            for t in range(first, last + 1):
                h, c, y = sab_bank_step(P, xs[t - 1], h, c, mem, _reads(t, cfg), config=cfg)
                l_chunk = l_chunk + loss_weight(loss.weights, t - 1) * step_loss(
                    y, targets[t - 1], loss.kind, P
                )
                if t % cfg.k_att == 0:
                    mem.write(_reads(t, cfg), h, store=False)
            outs, cts = mem.roots()
            torch.autograd.backward([l_chunk] + outs, [torch.ones_like(l_chunk)] + cts)
        mem.end_chunk()
        chunk_peak = max(chunk_peak, saved.total)
        if chunk == 0:
            d_h0, d_c0 = h_in.grad, c_in.grad
    d_h0 = _zero_if_none(d_h0, state0[0])
    if cfg.include_h0_memory and mem.grad is not None:
        d_h0 = d_h0 + mem.grad[0]  # h0 read as a memory: its reads' gradient joins dh0
    return RoutingResult(
        loss=float(total),
        grads={k: _zero_if_none(v.grad, v) for k, v in P.items()},
        d_state0=(d_h0, _zero_if_none(d_c0, state0[1])),
        final_state=final,
        peak_cache_bytes=stored + chunk_peak,
        replayed_chunks=tuple(replayed),
    )
