"""SAB around any recurrent cell (torch): full BPTT, sab_bptt and sparse replay.

A cell is ``cell(params, x_t, state) -> (h_hat, state')`` (see :mod:`.cells`); SAB adds
memcore's sparse retrieval over a **preallocated memory bank** around it (SAB Alg. 1):

    h_hat, state' = cell(params, x_t, state)
    s = sparse_retrieve(h_hat, bank[:N_t])           N_t = [include_h0_memory] + (t - 1) // k_att
    h = h_hat + s;  state' = state' with h as its hidden;  y_t = readout(params, h, s)
    bank[N_t] = h                                    when t % k_att == 0 (1-based t)

The bank is a ``steps.SABMemories``: ``values`` (N_max, B, Hd) with
N_max = [include_h0_memory] + T // k_att, allocated once, and its gradient accumulator. The
count of memories a step reads depends on ``t`` alone, so no mask is needed: every shape
in a step is fixed by (T, B, config) and the chunk structure by (T, k_trunc, trunc_phase).

Drivers (the gradients of docs/semantics.md R.3, R.5, R.6 for any cell):

- :func:`sab_loss`: the differentiable forward; ``.backward()`` on its loss gives full BPTT
  (``truncate=False``) or the SAB gradient of ``sab_bptt`` (``truncate=True``).
- :func:`sab_bptt`: that gradient as a ``RoutingResult``.
- :func:`sab_sparse_replay`: the same gradient holding one chunk's graph at a time.
- :func:`replay_accumulate`: sparse replay into the ``.grad`` of leaves the caller owns,
  returning the loss as a device tensor; with ``skip=False, account=False`` it makes no host
  sync, so a whole training step built on it can be captured as a CUDA graph
  (``memcore.train.fast_torch``). The library drivers and the compiled step share it.

Plug points for other semantics (issue 14, release mode): :func:`retrieval_for` is the one
function that picks the scorer and sparsifier from the config, and the truncation phase is
the ``trunc_phase`` argument (cuts entering every t > 1 with (t - 1 - trunc_phase) % k_trunc
== 0; 0 is memcore's chunking, k_trunc - 1 the authors' release).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils._pytree import tree_map

from memcore.backends.torch.accounting import SavedBytes, held_tensors, nbytes_of
from memcore.backends.torch.cells import sab_readout
from memcore.backends.torch.sab_core import (
    Call,
    Readout,
    Retrieval,
    capacity,
    check_call,
    chunk_starts,
    detach_state,
    flat_state,
    hidden,
    make_bank,
    n_read,
    retrieval_for,
    unflat_state,
    with_hidden,
)
from memcore.config import SABConfig
from memcore.routing_types import Loss, RoutingResult

if TYPE_CHECKING:
    from memcore.backends.torch.steps import SABMemories

__all__ = [
    "Retrieval",
    "SabRun",
    "capacity",
    "chunk_starts",
    "hidden",
    "n_read",
    "replay_accumulate",
    "retrieval_for",
    "sab_bptt",
    "sab_loss",
    "sab_sparse_replay",
    "with_hidden",
]


class SabRun(NamedTuple):
    """:func:`sab_loss`'s result: ``loss`` (0-d, differentiable), ``final_state`` (the cell
    state after step T, graph attached) and ``bank`` (the memories, ``values`` (N, B, Hd))."""

    loss: torch.Tensor
    final_state: Any
    bank: SABMemories


def sab_loss(
    cell,
    params: Mapping[str, torch.Tensor],
    xs: torch.Tensor,
    state0: Any,
    targets: torch.Tensor,
    *,
    config: SABConfig,
    loss: Loss = Loss(),
    truncate: bool = True,
    trunc_phase: int | None = None,
    readout: Readout = sab_readout,
    retrieval: str = "fast",
    check: bool = True,
    weights_dev: torch.Tensor | None = None,
) -> SabRun:
    """The SAB forward over the whole sequence, graph kept: L = sum_t weight_t l_t.

    ``run.loss.backward()`` gives the exact gradient of the forward with the stop-gradients
    of docs/semantics.md R.5 (chunk cuts only when ``truncate``): full BPTT of the SAB model
    with ``truncate=False``, ``sab_bptt``'s gradient with ``truncate=True``.

    Args:
        cell: ``cell(params, x_t, state) -> (h_hat, state')`` (see :mod:`.cells`).
        params: the cell's tensors plus ``w1, w2`` (Hd, A), ``w3`` (A,), the readout's
            (``v1, v2`` (Hd, O), ``b_y`` (O,) for :func:`.cells.sab_readout`) and ``head_w``
            (O, C) for loss "xent".
        xs: (T, B, I); state0: the cell's initial state (hidden (B, Hd) first).
        targets: (T, B, O) float (mse) or (T, B) class ids (xent).
        config: k_top, k_att, k_trunc, eps and the stop-gradient switches.
        trunc_phase: see :func:`chunk_starts`; None: ``config.trunc_phase``; readout: ``(params, h, s) -> y`` on (..., Hd).
        retrieval: "fast" (bank with hand-written backward) or "autograd".
        check: validate the inputs (False in a compiled step: validation reads nothing
            from the device but costs host time); weights_dev: see :func:`replay_accumulate`.
    """
    if check:
        check_call(params, xs, state0, targets, config, loss)
    call = Call(cell, params, xs, targets, config, loss, readout, weights_dev)
    return _whole(call, state0, retrieval_for(config, retrieval), truncate, trunc_phase)


def _whole(call: Call, state0, retrieval, truncate, trunc_phase) -> SabRun:
    cfg, T = call.cfg, int(call.xs.shape[0])
    phase = cfg.trunc_phase if trunc_phase is None else trunc_phase  # None: the config's
    starts = chunk_starts(T, cfg.k_trunc, phase) if truncate else (1,)
    mem = make_bank(call, state0, retrieval)
    mem.track()
    state = state0
    if cfg.include_h0_memory:
        mem.write(0, hidden(state0))
    total = call.xs.new_zeros(())
    for first, stop in zip(starts, (*starts[1:], T + 1)):
        if first > 1:
            state = detach_state(state)
        hs, ss = [], []
        for t in range(first, stop):
            state, h, s = call.step(t, state, mem)
            hs.append(h)
            ss.append(s)
            if t % cfg.k_att == 0:
                mem.write(n_read(t, cfg), h)
        part = call.loss(first, hs, ss)
        total = total if part is None else total + part
    outs, _ = mem.roots()  # the fast bank's last write token (value 0): it starts the bank's
    for tok in outs:  # backward, so .backward() on the loss alone is complete
        total = total + tok
    return SabRun(total, state, mem)


def _grads_of(leaves: Mapping[str, torch.Tensor], grads) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros_like(v) if g is None else g.detach()
        for (k, v), g in zip(leaves.items(), grads)
    }


def sab_bptt(
    cell,
    params,
    xs,
    state0,
    targets,
    *,
    config: SABConfig,
    loss: Loss = Loss(),
    truncate: bool = True,
    trunc_phase: int | None = None,
    readout: Readout = sab_readout,
    retrieval: str = "fast",
    check: bool = True,
) -> RoutingResult:
    """The gradient of :func:`sab_loss` (whole graph kept) as a ``RoutingResult``:
    ``d_state0`` shaped like ``state0`` (its hidden includes memory 0's gradient with
    include_h0_memory); ``final_state`` detached. Arguments as :func:`sab_loss`."""
    if check:
        check_call(params, xs, state0, targets, config, loss)
    P = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    s0 = tree_map(lambda x: x.detach().requires_grad_(True), state0)
    flat0 = list(flat_state(s0))
    call = Call(cell, P, xs, targets, config, loss, readout)
    with torch.enable_grad(), SavedBytes(held_tensors(params, xs, targets)) as saved:
        run = _whole(call, s0, retrieval_for(config, retrieval), truncate, trunc_phase)
        grads = torch.autograd.grad(run.loss, list(P.values()) + flat0, allow_unused=True)
    d0 = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(flat0, grads[len(P):])]
    return RoutingResult(
        loss=float(run.loss.detach()),
        grads=_grads_of(P, grads[: len(P)]),
        d_state0=unflat_state(state0, d0),
        final_state=detach_state(run.final_state),
        peak_cache_bytes=saved.total + nbytes_of([run.bank.values]),
    )


# ----------------------------------------------------------------------------- replay
class ReplayOut(NamedTuple):
    """:func:`replay_accumulate`'s result (tensors stay on the device)."""

    loss: torch.Tensor  # 0-d float64
    d_state0: list[torch.Tensor] | None  # flat, like state0; None unless asked
    final_state: Any
    replayed: tuple[int, ...]
    peak_cache_bytes: int


def replay_accumulate(
    cell,
    P: Mapping[str, torch.Tensor],
    xs: torch.Tensor,
    state0: Any,
    targets: torch.Tensor,
    *,
    config: SABConfig,
    loss: Loss = Loss(),
    trunc_phase: int | None = None,
    readout: Readout = sab_readout,
    retrieval: str = "fast",
    skip: bool = True,
    account: bool = True,
    want_d_state0: bool = True,
    weights_dev: torch.Tensor | None = None,
) -> ReplayOut:
    """Sparse replay (docs/semantics.md R.6) into ``.grad`` of the leaves ``P`` (inputs unchecked).

    A no-grad forward stores the cell state entering each chunk and the memory bank; chunks
    are then recomputed last to first and back-propagated with ``torch.autograd.backward``:
    their weighted losses plus the gradient later chunks accumulated for the memories they
    wrote; their reads add gradient to the memories they read.

    Args:
        skip: also skip chunks whose memories got no gradient, looked up on the device (one
            host sync per run of such chunks). False: only chunks that can get no gradient
            by their schedule (no loss weight, no memory written) are skipped, so nothing
            leaves the device (capturable). The gradient is the same either way.
        account: count ``peak_cache_bytes`` (saved-tensor hooks; 0 when False).
        want_d_state0: return dL/dstate0 (flat list like ``state0``).
        weights_dev: (T,) loss weights on the device (made on first need when None).
    """
    cfg, T = config, int(xs.shape[0])
    call = Call(cell, P, xs, targets, cfg, loss, readout, weights_dev)
    phase = cfg.trunc_phase if trunc_phase is None else trunc_phase  # None: the config's
    starts = chunk_starts(T, cfg.k_trunc, phase)
    bounds = list(zip(starts, (*starts[1:], T + 1)))
    mem = make_bank(call, state0, retrieval_for(cfg, retrieval))
    boundary: list[Any] = []
    state = detach_state(state0)
    if cfg.include_h0_memory:
        mem.write(0, hidden(state))
    total = xs.new_zeros((), dtype=torch.float64)
    with torch.no_grad():
        for first, stop in bounds:
            boundary.append(state)
            hs, ss = [], []
            for t in range(first, stop):
                state, h, s = call.step(t, state, mem)
                hs.append(h)
                ss.append(s)
                if t % cfg.k_att == 0:
                    j = n_read(t, cfg)
                    mem.write(j, h)
                    state = with_hidden(state, mem.values[j])  # boundary h shares the bank
            part = call.loss(first, hs, ss)
            if part is not None:
                total += part
    final = with_hidden(state, hidden(state).clone())
    stored_tensors = [x for b in boundary for x in flat_state(b)] + [mem.values]
    stored = nbytes_of(stored_tensors) if account else 0
    held = held_tensors(P, xs, targets) + stored_tensors
    d0 = flags = None
    replayed: list[int] = []
    chunk_peak = 0
    for chunk in reversed(range(len(bounds))):
        first, stop = bounds[chunk]
        lo, hi = n_read(first, cfg), n_read(stop, cfg)  # the slots this chunk writes
        if not call.has_loss(first, stop - 1):
            if lo == hi or not replayed:
                continue  # nothing can have sent gradient into this chunk
            if skip:
                if flags is None:  # valid for every chunk down to the next replay
                    flags = mem.grad[:hi].ne(0).flatten(1).any(1).tolist()
                if not any(flags[lo:hi]):
                    continue
        flags = None
        replayed.append(chunk)
        mem.begin_chunk(lo)
        leaf = want_d_state0 and chunk == 0
        state = tree_map(lambda x, g=leaf: x.detach().requires_grad_(g), boundary[chunk])
        state_in = flat_state(state)
        counter = SavedBytes(held) if account else _NoCount()
        with torch.enable_grad(), counter as saved:
            hs, ss = [], []
            for t in range(first, stop):
                state, h, s = call.step(t, state, mem)
                hs.append(h)
                ss.append(s)
                if t % cfg.k_att == 0:
                    mem.write(n_read(t, cfg), h, store=False)
            part = call.loss(first, hs, ss)
            outs, cts = mem.roots()
            if part is not None:
                outs, cts = [part, *outs], [torch.ones_like(part), *cts]
            if outs:
                torch.autograd.backward(outs, cts)
        mem.end_chunk()
        chunk_peak = max(chunk_peak, saved.total)
        if leaf:
            d0 = [torch.zeros_like(x) if x.grad is None else x.grad for x in state_in]
    if want_d_state0:
        if d0 is None:
            d0 = [torch.zeros_like(x) for x in flat_state(state0)]
        if cfg.include_h0_memory and mem.grad is not None:
            d0[0] = d0[0] + mem.grad[0]  # h0 read as a memory: its reads' gradient joins dh0
    return ReplayOut(total, d0, final, tuple(replayed), stored + chunk_peak)


class _NoCount:
    total = 0

    def __enter__(self) -> _NoCount:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def sab_sparse_replay(
    cell,
    params,
    xs,
    state0,
    targets,
    *,
    config: SABConfig,
    loss: Loss = Loss(),
    trunc_phase: int | None = None,
    readout: Readout = sab_readout,
    retrieval: str = "fast",
    check: bool = True,
) -> RoutingResult:
    """The gradient of :func:`sab_bptt` (``truncate=True``) keeping only the chunk-boundary
    states and the memory bank (docs/semantics.md R.6); arguments as :func:`sab_loss`.
    ``replayed_chunks``: 0-based chunk indices in replay order (descending)."""
    if check:
        check_call(params, xs, state0, targets, config, loss)
    P = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out = replay_accumulate(
        cell, P, xs, state0, targets, config=config, loss=loss, trunc_phase=trunc_phase,
        readout=readout, retrieval=retrieval,
    )  # fmt: skip
    return RoutingResult(
        loss=float(out.loss),
        grads={k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in P.items()},
        d_state0=unflat_state(state0, out.d_state0),
        final_state=detach_state(out.final_state),
        peak_cache_bytes=out.peak_cache_bytes,
        replayed_chunks=out.replayed,
    )
