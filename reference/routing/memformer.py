"""Memformer gradient routing: full BPTT and Memory Replay Back-Propagation (MRBP).

Both differentiate the same graph: steps t = 0..T-1 of :data:`memformer_step` with
``L = sum_t weight_t * l_t(y_t)``; ``truncate_every = k`` stops the gradient on M entering
every step t with t % k == 0, t > 0. MRBP (Memformer Alg. 1) keeps only M_0..M_T from a
forward pass without caches and recomputes one step at a time going backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcore.reference._xp import array_namespace
from memcore.reference.routing._common import GradSums, loss_cotangent
from memcore.reference.routing.accounting import PeakTracker
from memcore.reference.routing.losses import DEFAULT_LOSS, loss_forward, step_weights
from memcore.reference.steps import memformer_step
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult
from memcore.routing_validation import FORWARD_ONLY, check_memformer

__all__ = ["memformer_bptt", "memformer_unroll", "mrbp"]


def _per_step(resets: Any, token_mask: Any, t: int) -> dict[str, Any]:
    return {
        "reset": None if resets is None else resets[t, ...],
        "token_mask": None if token_mask is None else token_mask[t, ...],
    }


def _cut(t: int, truncate_every: int | None) -> bool:
    """Stop-gradient on M entering step t (t % k == 0, t > 0)."""
    return truncate_every is not None and t > 0 and t % truncate_every == 0


def _step_backward(
    grads: GradSums, cache: Any, loss_cache: Any, weight: float, d_memory: Any
) -> Any:
    """Backward of one step and its weighted loss term; returns dM_t."""
    step_grads, _, d_memory = memformer_step.backward(
        cache, d_memory, loss_cotangent(grads, loss_cache, weight)
    )
    grads.add(step_grads)
    return d_memory


def memformer_bptt(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
    resets: Any = None,
    token_mask: Any = None,
    truncate_every: int | None = None,
) -> RoutingResult:
    """Full BPTT of Memformer: keep every step's cache, one reverse sweep (the ground truth).

    Args:
        params: MEMFORMER_PARAMS (+ head_w (D, C) for loss "xent").
        xs: (T, B, L, D); state0: M_0 (B, K, D); targets: (T, B, L, D) float (mse) or
            (T, B, L) integer (xent); config: MemoryConfig.
        resets: (T, B) bool or None; token_mask: (T, B, L) bool or None.
        truncate_every: k or None: stop-gradient on M entering step t when t % k == 0, t > 0.

    Returns:
        RoutingResult with d_state0 = dM_0 and final_state = M_T.
    """
    check_memformer(params, xs, state0, targets, config, loss, resets, token_mask, truncate_every)
    steps = xs.shape[0]
    weights = step_weights(loss.weights, steps)
    head = params.get(HEAD_PARAM)
    tracker = PeakTracker(params)
    memory, total, caches = state0, 0.0, []
    for t in range(steps):
        memory, y, cache = memformer_step.forward(
            params, xs[t, ...], memory, config=config, **_per_step(resets, token_mask, t)
        )
        value, loss_cache = loss_forward(loss.kind, y, targets[t, ...], head)
        total += weights[t] * value
        caches.append((cache, loss_cache))
    tracker.observe(caches)  # the worst moment: every step's cache, before the sweep frees any
    grads, d_memory = GradSums(params), None  # no gradient reaches M_T
    for t in reversed(range(steps)):
        cache, loss_cache = caches.pop()
        d_memory = _step_backward(grads, cache, loss_cache, weights[t], d_memory)
        if _cut(t, truncate_every):
            d_memory = None
    return RoutingResult(total, grads.sums, d_memory, memory, tracker.peak)


def mrbp(
    params: Mapping[str, Any],
    xs: Any,
    M0: Any,
    targets: Any,
    *,
    config: Any,
    loss: Loss = DEFAULT_LOSS,
    resets: Any = None,
    token_mask: Any = None,
    truncate_every: int | None = None,
) -> RoutingResult:
    """Memory Replay Back-Propagation (Memformer Alg. 1), equal to :func:`memformer_bptt`.

    A forward pass keeps only M_0..M_T (each step's cache is dropped as soon as the step
    is done). Then for t = T-1 down to 0 it recomputes step t from M_t and back-propagates
    (weight_t * dl_t, dM_{t+1}) to that step's parameter gradients and dM_t. Step T-1 gets
    no memory gradient, so its write VJP is skipped. To chain rollouts, pass
    ``final_state`` (M_T) as the next call's ``M0``; passing ``d_state0`` (dM_0) on to the
    previous rollout's gradient is the caller's choice (not passing it truncates there).

    Args: as :func:`memformer_bptt` with ``M0`` the initial memory (B, K, D).

    Returns:
        RoutingResult with d_state0 = dM_0 and final_state = M_T.
    """
    check_memformer(
        params, xs, M0, targets, config, loss, resets, token_mask, truncate_every, memory_arg="M0"
    )
    steps = xs.shape[0]
    weights = step_weights(loss.weights, steps)
    head = params.get(HEAD_PARAM)
    tracker = PeakTracker(params)
    memories, total = [M0], 0.0  # the replay buffer M_0..M_T
    for t in range(steps):
        memory, y, cache = memformer_step.forward(
            params, xs[t, ...], memories[-1], config=config, **_per_step(resets, token_mask, t)
        )
        value, loss_cache = loss_forward(loss.kind, y, targets[t, ...], head)
        total += weights[t] * value
        memories.append(memory)
        tracker.observe(memories, cache, loss_cache)  # transient: dropped before the next step
    grads, d_memory = GradSums(params), None
    for t in reversed(range(steps)):
        _, y, cache = memformer_step.forward(
            params, xs[t, ...], memories[t], config=config, **_per_step(resets, token_mask, t)
        )
        _, loss_cache = loss_forward(loss.kind, y, targets[t, ...], head)
        tracker.observe(memories, cache, loss_cache)
        d_memory = _step_backward(grads, cache, loss_cache, weights[t], d_memory)
        if _cut(t, truncate_every):
            d_memory = None
    return RoutingResult(total, grads.sums, d_memory, memories[-1], tracker.peak)


def memformer_unroll(
    params: Mapping[str, Any],
    xs: Any,
    M0: Any,
    *,
    config: Any,
    resets: Any = None,
    token_mask: Any = None,
) -> tuple[Any, Any]:
    """The forward alone: (ys (T, B, L, D), M_T (B, K, D))."""
    check_memformer(
        params, xs, M0, FORWARD_ONLY, config, Loss(), resets, token_mask, None, memory_arg="M0"
    )
    xp = array_namespace(xs)
    memory, ys = M0, []
    for t in range(xs.shape[0]):
        memory, y, _ = memformer_step.forward(
            params, xs[t, ...], memory, config=config, **_per_step(resets, token_mask, t)
        )
        ys.append(y)
    return xp.stack(ys, axis=0), memory
