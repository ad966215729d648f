"""SAB routing in JAX for the backend contract: full BPTT, sab_bptt and sparse replay.

Thin wrappers over :mod:`memcore.backends.jax.sab_model` with memcore's LSTM cell
(:data:`LSTM_NET`): validation, the loss weights, and a :class:`RoutingResult` with the
bytes held. The computation is the compiled one (``lax.scan`` over time, over chunks for
the replay; one program per shape).

``peak_cache_bytes``: BPTT and sab_bptt count the residuals of ``jax.vjp`` of the whole
scan. Sparse replay counts what it stores (the bank with its keys, the state entering
every chunk) plus the residuals of one chunk's ``jax.vjp``, measured by tracing that vjp
(``jax.eval_shape``: nothing is computed), because the replay's own live in XLA.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from memcore.backends.jax._driver import scalar, vjp_driver, weights_array
from memcore.backends.jax.sab_bank import bank_init, bank_slots, retrieval
from memcore.backends.jax.sab_model import (
    LSTM_NET,
    _run_chunk,
    chunk_layout,
    replay_core,
    rollout_loss,
    trunc_phase,
)
from memcore.routing_types import Loss, RoutingResult
from memcore.routing_validation import check_sab

__all__ = ["peak_bytes", "sab_bptt", "sab_full_bptt", "sab_sparse_replay"]


def _graph(params, state0, xs, targets, weights, *, config, kind, truncate):
    return rollout_loss(
        LSTM_NET, params, state0, xs, targets, weights, config=config, loss=kind, truncate=truncate
    )


_sab_graph = jax.jit(_graph, static_argnames=("config", "kind", "truncate"))


def _sab_whole(params, xs, state0, targets, *, config, loss, truncate):
    check_sab(params, xs, state0, targets, config, loss)
    weights = weights_array(loss, xs.shape[0], xs.dtype)
    state0 = tuple(state0)

    def fn(p, s):
        return _sab_graph(
            p, s, xs, targets, weights, config=config, kind=loss.kind, truncate=truncate
        )

    value, final, grads, d_s0, held = vjp_driver(fn, dict(params), state0, (xs, targets))
    return RoutingResult(scalar(value), grads, tuple(d_s0), tuple(final), held)


def sab_bptt(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """SAB with chunked truncation, keeping the whole masked graph (one ``jax.vjp``).

    Args:
        params: SAB_PARAMS (+ head_w for xent); xs: (T, B, I); state0: (h0, c0), each (B, Hd);
        targets: (T, B, O) float (mse) or (T, B) integers (xent); config: SABConfig.
    """
    return _sab_whole(params, xs, state0, targets, config=config, loss=loss, truncate=True)


def sab_full_bptt(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """Plain BPTT of the SAB forward: the step's own stop-gradients, no chunk truncation."""
    return _sab_whole(params, xs, state0, targets, config=config, loss=loss, truncate=False)


def _nbytes(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _spec(tree):
    """Shapes and dtypes of a pytree of arrays (or of ShapeDtypeStructs): hashable, flat."""
    spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    flat, treedef = jax.tree_util.tree_flatten(spec)
    return tuple(flat), treedef


def _residual_bytes(fn, *args) -> int:
    """Bytes of the residuals ``jax.vjp(fn, *args)`` keeps, the arguments themselves
    excluded, found by tracing (``jax.eval_shape``: nothing is computed)."""

    def residuals(*a):
        _, pull = jax.vjp(fn, *a)
        mine = {id(v) for v in jax.tree_util.tree_leaves(a)}
        return [r for r in jax.tree_util.tree_leaves(pull) if id(r) not in mine]

    return _nbytes(jax.eval_shape(residuals, *args))


@functools.lru_cache(maxsize=64)
def _bytes_of(flat, treedef, method, config, kind) -> int:
    params, xs, state0, targets, weights = jax.tree_util.tree_unflatten(treedef, list(flat))
    if method != "sparse_replay":

        def whole(p, s, x, tg, w):
            return rollout_loss(
                LSTM_NET, p, s, x, tg, w, config=config, loss=kind, truncate=method != "bptt"
            )[0]

        return _residual_bytes(whole, params, state0, xs, targets, weights)
    steps = xs.shape[0]
    _, size, count = chunk_layout(steps, config.k_trunc, trunc_phase(config))
    rt = retrieval(config)
    slots = bank_slots(steps, config)
    h0, c0 = state0

    def head(x):
        return jax.ShapeDtypeStruct((size,) + tuple(x.shape[1:]), x.dtype)

    bank = jax.eval_shape(lambda p, h: bank_init(rt, p, h, slots, config), params, h0)
    def steps_of(dtype):
        return jax.ShapeDtypeStruct((size,), dtype)

    chunk = (head(xs), steps_of(jnp.int32), head(targets), head(weights), steps_of(jnp.bool_))

    def fn(p, h, c, bank, chunk):
        return _run_chunk(LSTM_NET, rt, config, kind, 1, p, h, c, *bank, chunk)[0]

    held = _residual_bytes(fn, params, h0, c0, bank, chunk)
    return _nbytes(bank) + count * _nbytes((h0, c0)) + held


def peak_bytes(method, params, xs, targets, weights, config, kind) -> int:
    """The bytes a routing ``method`` ("bptt", "sab_bptt", "tbptt", "sparse_replay") holds
    for this shape, from h0 = c0 (B, Hd): the whole scan's residuals, or sparse replay's
    stored bank, keys and chunk-entry states plus one chunk's residuals. Arrays or
    ShapeDtypeStructs; only shapes and dtypes are read."""
    h0 = jax.ShapeDtypeStruct((xs.shape[1], params["lstm_w"].shape[1] // 4), xs.dtype)
    flat, treedef = _spec((dict(params), xs, (h0, h0), targets, weights))
    return _bytes_of(flat, treedef, method, config, kind)


def sab_sparse_replay(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """SAB sparse replay: same gradients as :func:`sab_bptt`, chunk by chunk in reverse.

    Keeps (h, c) entering each chunk and the memory bank; replays chunk j with cotangents
    (1 for its loss, the accumulated gradient of the memories it wrote) and adds the
    gradient it sends to earlier memories. Skips a chunk with no non-zero loss weight and
    no non-zero gradient on its memories. ``replayed_chunks``: 0-based chunk indices in
    replay order (last chunk first).
    """
    check_sab(params, xs, state0, targets, config, loss)
    params = dict(params)
    weights = weights_array(loss, xs.shape[0], xs.dtype)
    state0 = tuple(state0)
    r = replay_core(
        LSTM_NET, params, xs, (state0[0], state0[1]), targets, weights, config=config,
        loss=loss.kind,
    )  # fmt: skip
    if isinstance(r.replayed, jax.core.Tracer):
        replayed = None  # decided on the device: unknown while tracing
    else:
        flags = [bool(f) for f in jax.device_get(r.replayed)]
        replayed = tuple(j for j in range(len(flags) - 1, -1, -1) if flags[j])
    peak = peak_bytes("sparse_replay", params, xs, targets, weights, config, loss.kind)
    return RoutingResult(
        scalar(r.loss), r.grads, tuple(r.d_state0), tuple(r.final_state), peak, replayed
    )
