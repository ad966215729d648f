"""Shared pieces of the JAX routing drivers: the vjp driver and memory accounting.

``peak_cache_bytes`` counts arrays the drivers hold: ``jax.vjp`` pullback leaves (the
residuals) and stored states, each array once (by identity), excluding the caller's
own inputs and parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from memcore.backends.jax._common import compute_dtype
from memcore.routing_types import Loss, RoutingResult

__all__ = ["held_bytes", "scalar", "tree_add", "vjp_driver", "weights_array"]

tree_add = functools.partial(jax.tree_util.tree_map, jnp.add)


def scalar(value: Any) -> Any:
    """``float(value)`` for a concrete loss; the traced array itself under ``jax.jit``/``grad``.

    A traced value has no number yet, so a driver called inside a transformation returns
    the loss as a 0-d array (its :class:`RoutingResult` is a pytree, see ``_pytrees``).
    """
    if isinstance(value, jax.core.Tracer):
        return value
    return float(value)


def held_bytes(arrays: Iterable[Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes of distinct arrays (by identity), skipping those in ``exclude``."""
    seen = {id(x) for x in jax.tree_util.tree_leaves(list(exclude))}
    total = 0
    for x in jax.tree_util.tree_leaves(list(arrays)):
        if id(x) not in seen and hasattr(x, "nbytes"):
            seen.add(id(x))
            total += int(x.nbytes)
    return total


def weights_array(loss: Loss, t: int, dtype: Any) -> jax.Array:
    """The per-step loss weights (T,) in the compute dtype (all ones when unset)."""
    return jnp.asarray(
        loss.weights if loss.weights is not None else (1.0,) * t, dtype=compute_dtype(dtype)
    )


def vjp_driver(fn, params, state0, caller_inputs) -> tuple[Any, Any, Any, Any, int]:
    """jax.vjp of ``fn(params, state0) -> (loss, final)``: (loss, final, grads, d_state0, bytes)."""
    loss, pull, final = jax.vjp(fn, params, state0, has_aux=True)
    held = held_bytes(jax.tree_util.tree_leaves(pull), exclude=(params, state0, caller_inputs))
    grads, d_state0 = pull(jnp.ones_like(loss))
    return loss, final, grads, d_state0, held


def _flatten_result(r: RoutingResult) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (r.loss, r.grads, r.d_state0, r.final_state), (r.peak_cache_bytes, r.replayed_chunks)


def _unflatten_result(aux: tuple[Any, ...], children: Iterable[Any]) -> RoutingResult:
    loss, grads, d_state0, final_state = children
    return RoutingResult(loss, grads, d_state0, final_state, *aux)


# A RoutingResult leaves a jitted function like any pytree: the arrays (and the loss) are
# leaves, the byte count and the replayed chunks are static.
jax.tree_util.register_pytree_node(RoutingResult, _flatten_result, _unflatten_result)
