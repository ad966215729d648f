"""SAB routing in JAX: full BPTT, sab_bptt (chunk-truncated) and sparse replay.

The forward is ``sab_step`` for t = 1..T (a python loop inside ``jit``: the memories grow).
``sab_bptt`` puts ``lax.stop_gradient`` on (h, c) entering every step t > 1 with
(t - 1) % k_trunc == 0, and nowhere else (memory edges are never cut); the sparsify
threshold and the scorer inputs carry the step's own stop-gradients. Sparse replay keeps
(h, c) entering each chunk and the memory vectors, replays chunks last to first with
``jax.vjp`` and skips chunks that receive no gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from memcore.backends.jax._driver import held_bytes, tree_add, vjp_driver, weights_array
from memcore.backends.jax.steps import sab_step, step_loss
from memcore.routing_validation import check_sab

from memcore.routing_types import Loss, RoutingResult

__all__ = ["sab_bptt", "sab_full_bptt", "sab_sparse_replay"]


def _sab_run(params, h, c, prev, xs, targets, weights, *, t_start, config, kind, truncate):
    """Steps t_start.. (1-based) from (h, c) with memories ``prev`` (tuple of (B, Hd)).

    Returns (weighted loss, memories written here (tuple), h, c).
    """
    mems, new = list(prev), []
    total = jnp.zeros((), dtype=weights.dtype)
    for i in range(xs.shape[0]):
        t = t_start + i
        if truncate and t > 1 and (t - 1) % config.k_trunc == 0:
            # Chunked truncated BPTT: only (h, c) are cut; memory edges stay.
            h, c = lax.stop_gradient(h), lax.stop_gradient(c)
        pool = mems + new
        memories = (
            jnp.stack(pool, axis=1) if pool else jnp.zeros((h.shape[0], 0, h.shape[1]), h.dtype)
        )
        h, c, y = sab_step(params, xs[i], h, c, memories, config=config)
        total = total + weights[i] * step_loss(params, y, targets[i], kind)
        if t % config.k_att == 0:
            new.append(h)  # not detached: gradient reaching it flows back through its chunk
    return total, tuple(new), h, c


@functools.partial(jax.jit, static_argnames=("config", "kind", "truncate"))
def _sab_graph(params, state0, xs, targets, weights, *, config, kind, truncate):
    h0, c0 = state0
    prev = (h0,) if config.include_h0_memory else ()
    value, _, h, c = _sab_run(
        params,
        h0,
        c0,
        prev,
        xs,
        targets,
        weights,
        t_start=1,
        config=config,
        kind=kind,
        truncate=truncate,
    )
    return value, (h, c)


@functools.partial(jax.jit, static_argnames=("t_start", "config", "kind"))
def _sab_chunk(params, h, c, prev, xs, targets, weights, *, t_start, config, kind):
    value, new, h, c = _sab_run(
        params,
        h,
        c,
        prev,
        xs,
        targets,
        weights,
        t_start=t_start,
        config=config,
        kind=kind,
        truncate=True,
    )
    return (value, new), (h, c)


def _sab_whole(params, xs, state0, targets, *, config, loss, truncate):
    check_sab(params, xs, state0, targets, config, loss)
    weights = weights_array(loss, xs.shape[0], xs.dtype)
    state0 = tuple(state0)

    def fn(p, s):
        return _sab_graph(
            p, s, xs, targets, weights, config=config, kind=loss.kind, truncate=truncate
        )

    value, final, grads, d_s0, held = vjp_driver(fn, dict(params), state0, (xs, targets))
    return RoutingResult(float(value), grads, tuple(d_s0), tuple(final), held)


def sab_bptt(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """SAB with chunked truncation, keeping the whole masked graph (one jax.vjp).

    Args:
        params: SAB_PARAMS (+ head_w for xent); xs: (T, B, I); state0: (h0, c0), each (B, Hd);
        targets: (T, B, O) float (mse) or (T, B) integers (xent); config: SABConfig.
    """
    return _sab_whole(params, xs, state0, targets, config=config, loss=loss, truncate=True)


def sab_sparse_replay(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """SAB sparse replay: same gradients as :func:`sab_bptt`, chunk by chunk in reverse.

    Keeps (h, c) entering each chunk and the memory vectors; replays chunk j with
    cotangents (1 for its loss, the accumulated gradient of the memories it wrote) and
    adds the gradient it sends to earlier memories. Skips a chunk with no non-zero loss
    weight and no non-zero gradient on its memories. ``replayed_chunks``: 0-based chunk
    indices in replay order (last chunk first).
    """
    check_sab(params, xs, state0, targets, config, loss)
    params = dict(params)
    n, k = xs.shape[0], config.k_trunc
    weights = weights_array(loss, n, xs.dtype)
    host_w = [float(w) for w in (loss.weights or (1.0,) * n)]
    h0, c0 = state0
    mems = [h0] if config.include_h0_memory else []
    owner = [-1] * len(mems)  # the chunk that wrote each memory (-1: h0)
    boundary, values = [], []
    h, c = h0, c0
    n_chunks = math.ceil(n / k)
    for j in range(n_chunks):
        lo, hi = j * k, min(n, (j + 1) * k)
        boundary.append((h, c, sum(o < j for o in owner)))
        (value, new), (h, c) = _sab_chunk(
            params,
            h,
            c,
            tuple(mems),
            xs[lo:hi],
            targets[lo:hi],
            weights[lo:hi],
            t_start=lo + 1,
            config=config,
            kind=loss.kind,
        )
        values.append(value)
        mems.extend(new)
        owner.extend([j] * len(new))
    stored = held_bytes([b[:2] for b in boundary] + mems, exclude=(h0, c0)) + int(
        h0.nbytes + c0.nbytes
    )
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    d_mem: list[Any] = [None] * len(mems)
    dh0, dc0 = jnp.zeros_like(h0), jnp.zeros_like(c0)
    replayed, peak = [], stored
    for j in range(n_chunks - 1, -1, -1):
        lo, hi = j * k, min(n, (j + 1) * k)
        mine = [i for i, o in enumerate(owner) if o == j]
        has_loss = any(w != 0.0 for w in host_w[lo:hi])
        has_grad = any(d_mem[i] is not None and bool(jnp.any(d_mem[i] != 0)) for i in mine)
        if not (has_loss or has_grad):
            continue
        replayed.append(j)
        h_in, c_in, n_prev = boundary[j]

        def fn(p, hh, cc, prev, lo=lo, hi=hi):
            return _sab_chunk(
                p,
                hh,
                cc,
                prev,
                xs[lo:hi],
                targets[lo:hi],
                weights[lo:hi],
                t_start=lo + 1,
                config=config,
                kind=loss.kind,
            )[0]

        (value, new), pull = jax.vjp(fn, params, h_in, c_in, tuple(mems[:n_prev]))
        held = held_bytes(
            jax.tree_util.tree_leaves(pull), exclude=(params, xs, targets, mems, boundary)
        )
        peak = max(peak, stored + held)
        ct_new = tuple(d_mem[i] if d_mem[i] is not None else jnp.zeros_like(mems[i]) for i in mine)
        dp, dh, dc, d_prev = pull((jnp.ones_like(value), ct_new))
        grads = tree_add(grads, dp)
        for i, g in enumerate(d_prev):
            d_mem[i] = g if d_mem[i] is None else d_mem[i] + g
        if j == 0:  # (h, c) entering chunk j > 0 are cut inside the chunk: dh = dc = 0 there
            dh0, dc0 = dh, dc
    if config.include_h0_memory and d_mem[0] is not None:
        dh0 = dh0 + d_mem[0]
    total = float(sum(float(v) for v in values))
    return RoutingResult(total, grads, (dh0, dc0), (h, c), peak, tuple(replayed))


def sab_full_bptt(params, xs, state0, targets, *, config, loss=Loss()) -> RoutingResult:
    """Plain BPTT of the SAB forward: the step's own stop-gradients, no chunk truncation."""
    return _sab_whole(params, xs, state0, targets, config=config, loss=loss, truncate=False)
