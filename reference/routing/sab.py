"""SAB gradient routing that keeps the whole graph: plain BPTT and chunk-truncated sab_bptt.

The forward is :data:`sab_step` for t = 1..T from (h0, c0) and the memories ([h0] with
``include_h0_memory``, else empty); ``L = sum_t weight_t * l_t(y_t)``. The gradient is the
exact gradient of that graph with stop-gradients only at: the sparsify threshold (unless
``threshold_grad``), the scorer's inputs (with ``block_score_grad``) and, for sab_bptt only,
(h, c) entering every step t > 1 with (t - 1) % k_trunc == 0. Memory edges are never cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from memcore.reference._xp import array_namespace
from memcore.reference.routing._common import GradSums, loss_cotangent
from memcore.reference.routing.accounting import PeakTracker
from memcore.reference.routing.losses import DEFAULT_LOSS, loss_forward, step_weights
from memcore.reference.steps import SabState, sab_step, stack_memories
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult
from memcore.routing_validation import FORWARD_ONLY, check_sab

__all__ = [
    "SabUnroll",
    "backward_steps",
    "chunk_bounds",
    "initial_state",
    "is_boundary",
    "sab_bptt",
    "sab_full_bptt",
    "sab_memory_grads",
    "sab_unroll",
]


def initial_state(state0: Any, config: Any) -> SabState:
    """SabState(h0, c0, memories) with memories (h0,) when include_h0_memory, else ()."""
    h0, c0 = state0
    return SabState(h0, c0, (h0,) if config.include_h0_memory else ())


def is_boundary(t: int, k_trunc: int) -> bool:
    """(h, c) entering step t (1-based) is stop-gradiented: t > 1 and (t - 1) % k_trunc == 0."""
    return t > 1 and (t - 1) % k_trunc == 0


def chunk_bounds(steps: int, k_trunc: int) -> list[tuple[int, int]]:
    """Chunks as 1-based [start, stop): chunk m starts at step 1 + m * k_trunc."""
    return [(start, min(start + k_trunc, steps + 1)) for start in range(1, steps + 1, k_trunc)]


def backward_steps(
    records: list[tuple[int, Any, Any]],
    weights: tuple[float, ...],
    grads: GradSums,
    d_memories: list[Any],
    *,
    k_trunc: int | None,
    dh: Any = None,
    dc: Any = None,
) -> tuple[Any, Any]:
    """Reverse sweep over ``records`` = [(t, step cache, loss cache)] in forward order.

    ``d_memories[j]`` accumulates dL/d(memory j) from the reads (None = zero); a step that
    wrote memory j consumes it as extra gradient on its h'. Because every read of memory j
    happens after its write, the sum is complete when the writing step is reached. With
    ``k_trunc`` set, (dh, dc) is dropped after each boundary step. Returns (dh, dc) entering
    the first record's step.
    """
    for t, cache, loss_cache in reversed(records):
        d_y = loss_cotangent(grads, loss_cache, weights[t - 1])
        n_out = cache.n_read + int(cache.wrote)
        step_grads, _, d_state = sab_step.backward(
            cache, SabState(dh, dc, tuple(d_memories[:n_out])), d_y
        )
        grads.add(step_grads)
        d_memories[: cache.n_read] = d_state.memories
        dh, dc = d_state.h, d_state.c
        if k_trunc is not None and is_boundary(t, k_trunc):
            dh = dc = None
    return dh, dc


def _count_memories(steps: int, config: Any) -> int:
    return int(config.include_h0_memory) + steps // config.k_att


def _whole_graph(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    config: Any,
    loss: Loss,
    truncate: bool,
) -> tuple[RoutingResult, list[Any]]:
    check_sab(params, xs, state0, targets, config, loss)
    steps = xs.shape[0]
    weights = step_weights(loss.weights, steps)
    head = params.get(HEAD_PARAM)
    tracker = PeakTracker(params)
    state, total, records = initial_state(state0, config), 0.0, []
    for t in range(1, steps + 1):
        state, y, cache = sab_step.forward(params, xs[t - 1, ...], state, config=config, t=t)
        value, loss_cache = loss_forward(loss.kind, y, targets[t - 1, ...], head)
        total += weights[t - 1] * value
        records.append((t, cache, loss_cache))
    tracker.observe(records)  # the worst moment: every step's cache
    grads = GradSums(params)
    d_memories: list[Any] = [None] * _count_memories(steps, config)
    dh0, dc0 = backward_steps(
        records, weights, grads, d_memories, k_trunc=config.k_trunc if truncate else None
    )
    if config.include_h0_memory and d_memories[0] is not None:
        dh0 = dh0 + d_memories[0]  # h0 is memory 0: its reads' gradient reaches the initial state
    result = RoutingResult(total, grads.sums, (dh0, dc0), (state.h, state.c), tracker.peak)
    return result, d_memories


def sab_full_bptt(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
) -> RoutingResult:
    """Plain BPTT of the SAB forward: the step's own stop-gradients, no chunk truncation.

    Args:
        params: SAB_PARAMS (+ head_w (O, C) for loss "xent").
        xs: (T, B, I); state0: (h0, c0) each (B, Hd); targets: (T, B, O) float (mse) or
            (T, B) integer (xent); config: SABConfig (its k_trunc is ignored here).

    Returns:
        RoutingResult with d_state0 = (dh0, dc0) and final_state = (h_T, c_T).
    """
    return _whole_graph(params, xs, state0, targets, config, loss, truncate=False)[0]


def sab_bptt(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
) -> RoutingResult:
    """The SAB gradient on the whole masked graph: (h, c) cut entering each chunk start.

    Args: as :func:`sab_full_bptt`; config.k_trunc sets the chunks.

    Returns:
        RoutingResult with d_state0 = (dh0, dc0) and final_state = (h_T, c_T).
    """
    return _whole_graph(params, xs, state0, targets, config, loss, truncate=True)[0]


def sab_memory_grads(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
) -> tuple[Any, ...]:
    """dL/d(memory j) under sab_bptt, for j = 0..N-1: each (B, Hd), the gradient the reads
    send into memory j (which then flows back through its writing step's chunk)."""
    _, d_memories = _whole_graph(params, xs, state0, targets, config, loss, truncate=True)
    xp = array_namespace(xs)
    zero = xp.zeros_like(state0[0])
    return tuple(zero if d is None else d for d in d_memories)


class SabUnroll(NamedTuple):
    """The SAB forward: ys (T, B, O); final_state (h_T, c_T); memories (B, N, Hd) as written;
    weights: T arrays (B, N_t), the sparse retrieval weights of each step's read."""

    ys: Any
    final_state: tuple[Any, Any]
    memories: Any
    weights: tuple[Any, ...]


def sab_unroll(params: Mapping[str, Any], xs: Any, state0: Any, *, config: Any) -> SabUnroll:
    """Run the SAB forward alone (no caches kept): see :class:`SabUnroll`."""
    check_sab(params, xs, state0, FORWARD_ONLY, config, Loss())
    xp = array_namespace(xs)
    state, ys, weights = initial_state(state0, config), [], []
    for t in range(1, xs.shape[0] + 1):
        state, y, cache = sab_step.forward(params, xs[t - 1, ...], state, config=config, t=t)
        ys.append(y)
        weights.append(cache.retrieve.w)
    memories = stack_memories(state.memories, state.h)
    return SabUnroll(xp.stack(ys, axis=0), (state.h, state.c), memories, tuple(weights))
