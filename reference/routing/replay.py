"""SAB sparse replay: the sab_bptt gradient from chunk-boundary states and memory vectors.

The forward keeps only (h, c) entering each chunk and the memory vectors (plus, per
memory, the chunk that wrote it: one integer). The backward then replays chunks last to
first: recompute the chunk from its boundary state with the stored memories, and sweep it
backward with the memory gradients accumulated from later reads. Since (h, c) is cut at
every chunk start, chunks are linked only through memories, so a chunk is skipped when it
receives no gradient: every loss weight in it is 0 and every memory it wrote has an exactly
zero accumulated gradient. Skipping such a chunk changes no gradient (all its cotangents
are zero), so the result equals :func:`memcore.reference.routing.sab.sab_bptt`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcore.reference._xp import array_namespace
from memcore.reference.routing._common import GradSums
from memcore.reference.routing.accounting import PeakTracker
from memcore.reference.routing.losses import DEFAULT_LOSS, loss_forward, step_weights
from memcore.reference.routing.sab import backward_steps, chunk_bounds, initial_state
from memcore.reference.steps import SabState, sab_step
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult
from memcore.routing_validation import check_sab

__all__ = ["sab_sparse_replay"]


def _receives_gradient(
    chunk: int,
    step_range: range,
    weights: tuple[float, ...],
    writer: list[int],
    d_memories: list[Any],
) -> bool:
    if any(weights[t - 1] != 0.0 for t in step_range):
        return True
    xp = None
    for j, m in enumerate(writer):
        if m == chunk and d_memories[j] is not None:
            xp = xp or array_namespace(d_memories[j])
            if bool(xp.any(d_memories[j] != 0)):
                return True
    return False


def sab_sparse_replay(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
) -> RoutingResult:
    """sab_bptt's gradient, holding at most one chunk's cache at a time.

    Args:
        params: SAB_PARAMS (+ head_w (O, C) for loss "xent").
        xs: (T, B, I); state0: (h0, c0) each (B, Hd); targets: (T, B, O) float (mse) or
            (T, B) integer (xent); config: SABConfig (k_trunc sets the chunks).

    Returns:
        RoutingResult with d_state0 = (dh0, dc0), final_state = (h_T, c_T) and
        replayed_chunks: the 0-based indices of the chunks replayed, in replay order
        (descending). Chunk m holds the 1-based steps 1 + m k_trunc .. (m + 1) k_trunc.
    """
    check_sab(params, xs, state0, targets, config, loss)
    steps = xs.shape[0]
    weights = step_weights(loss.weights, steps)
    head = params.get(HEAD_PARAM)
    tracker = PeakTracker(params)
    chunks = chunk_bounds(steps, config.k_trunc)
    state = initial_state(state0, config)
    boundaries: list[tuple[Any, Any]] = []  # (h, c) entering each chunk
    writer = [-1] * len(state.memories)  # the chunk that wrote each memory; -1: h0
    total = 0.0
    for m, (start, stop) in enumerate(chunks):
        boundaries.append((state.h, state.c))
        for t in range(start, stop):
            state, y, cache = sab_step.forward(params, xs[t - 1, ...], state, config=config, t=t)
            value, loss_cache = loss_forward(loss.kind, y, targets[t - 1, ...], head)
            total += weights[t - 1] * value
            writer += [m] * int(cache.wrote)
            tracker.observe(boundaries, state.memories, cache, loss_cache)  # transient step cache
    memories = state.memories
    grads = GradSums(params)
    d_memories: list[Any] = [None] * len(memories)
    replayed: list[int] = []
    dh0 = dc0 = None
    for m in reversed(range(len(chunks))):
        start, stop = chunks[m]
        if not _receives_gradient(m, range(start, stop), weights, writer, d_memories):
            continue
        replayed.append(m)
        n_start = sum(1 for w in writer if w < m)  # memories present entering the chunk
        replay = SabState(*boundaries[m], memories[:n_start])
        records = []
        for t in range(start, stop):
            replay, y, cache = sab_step.forward(params, xs[t - 1, ...], replay, config=config, t=t)
            records.append((t, cache, loss_forward(loss.kind, y, targets[t - 1, ...], head)[1]))
        tracker.observe(boundaries, memories, records)
        # Chunk m's last (h, c) feeds a cut boundary (or is h_T): no gradient enters it.
        dh, dc = backward_steps(records, weights, grads, d_memories, k_trunc=None)
        if m == 0:
            dh0, dc0 = dh, dc
    xp = array_namespace(xs)
    h0, c0 = state0
    dh0 = xp.zeros_like(h0) if dh0 is None else dh0
    dc0 = xp.zeros_like(c0) if dc0 is None else dc0
    if config.include_h0_memory and d_memories[0] is not None:
        dh0 = dh0 + d_memories[0]
    return RoutingResult(
        total, grads.sums, (dh0, dc0), (state.h, state.c), tracker.peak, tuple(replayed)
    )
