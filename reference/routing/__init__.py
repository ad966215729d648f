"""Gradient routing in the reference: how gradients travel through time, hand-written.

Drivers (every backend exposes the same four, see ``docs/semantics.md``):

* :func:`bptt` (``step`` "memformer" or "sab"): every step's cache, one reverse sweep.
* :func:`mrbp`: Memformer Alg. 1, memories M_0..M_T only, one step recomputed at a time.
* :func:`sab_bptt`: SAB's whole masked graph with chunked truncation of (h, c).
* :func:`sab_sparse_replay`: the same gradient from chunk-boundary states and memory
  vectors, replaying chunks last to first and skipping chunks that receive no gradient.

Each returns a :class:`memcore.routing_types.RoutingResult`. The forward-only unrolls
(:func:`memformer_unroll`, :func:`sab_unroll`) and :func:`sab_memory_grads` help tests
and backends compare intermediate values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcore.reference.routing.losses import DEFAULT_LOSS
from memcore.reference.routing.memformer import memformer_bptt, memformer_unroll, mrbp
from memcore.reference.routing.replay import sab_sparse_replay
from memcore.reference.routing.sab import (
    SabUnroll,
    sab_bptt,
    sab_full_bptt,
    sab_memory_grads,
    sab_unroll,
)
from memcore.reference.steps import Step, get_step
from memcore.routing_types import Loss, RoutingResult
from memcore.routing_validation import reject_memformer_only

__all__ = [
    "SabUnroll",
    "bptt",
    "memformer_unroll",
    "mrbp",
    "sab_bptt",
    "sab_memory_grads",
    "sab_sparse_replay",
    "sab_unroll",
]


def bptt(
    step: str | Step,
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
    """Full back-propagation through time of ``step`` ("memformer" or "sab"): the ground truth.

    Keeps every step's cache and sweeps once in reverse. For "sab" the gradient keeps the
    step's own stop-gradients (threshold_grad, block_score_grad) but no chunk truncation;
    ``resets``, ``token_mask`` and ``truncate_every`` are Memformer's and must be None.

    Args:
        step: "memformer" or "sab" (or the Step record).
        params: the step's parameters (+ head_w for loss "xent").
        xs: (T, B, L, D) Memformer; (T, B, I) SAB.
        state0: M_0 (B, K, D) Memformer; (h0, c0) each (B, Hd) SAB.
        targets: see :func:`mrbp` and :func:`sab_bptt`.
        config: MemoryConfig or SABConfig.
        loss: the Loss (kind and per-step weights).
        resets, token_mask, truncate_every: Memformer only, see :func:`mrbp`.

    Returns:
        RoutingResult.
    """
    chosen = get_step(step)
    if chosen.name == "sab":
        reject_memformer_only(
            "sab", resets=resets, token_mask=token_mask, truncate_every=truncate_every
        )
        return sab_full_bptt(params, xs, state0, targets, config=config, loss=loss)
    return memformer_bptt(
        params,
        xs,
        state0,
        targets,
        config=config,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
    )
