"""Gradient routing through time in JAX: BPTT, MRBP and SAB sparse replay.

Every driver returns a :class:`memcore.routing_types.RoutingResult`; gradients come from
``jax.vjp``. Semantics are those of the routing contract in ``docs/semantics.md``.

* ``bptt``: Memformer as one ``lax.scan``; SAB as one unrolled graph (memories grow, so a
  python loop inside ``jit``); no chunk truncation.
* ``mrbp(method="checkpoint")``: the same scan over ``jax.checkpoint``-ed steps with the
  ``nothing_saveable`` policy: the forward saves only each step's inputs, i.e. the memory
  carries M_0..M_{T-1} (plus slices of the caller's own xs/targets), and the backward
  recomputes one step at a time: MRBP (Memformer Alg. 1) in JAX's terms.
  ``mrbp(method="replay")``: Alg. 1 literally: a no-grad forward storing M_0..M_T, then a
  python loop t = T-1..0 of ``jax.vjp`` of one jitted step with cotangent (dM_{t+1}, 1).
* ``sab_bptt``: the whole graph with ``lax.stop_gradient`` on (h, c) entering every step t
  with t > 1 and (t - 1) % k_trunc == 0. ``sab_sparse_replay``: chunk-boundary states and
  memory vectors only; chunks replayed in reverse (``replayed_chunks`` lists them in that
  order, last chunk first), skipping every chunk with no non-zero loss weight and no
  non-zero gradient on a memory it wrote.

``peak_cache_bytes`` counts the arrays the driver holds between forward and backward: the
leaves of the ``jax.vjp`` pullbacks (its residuals) plus stored states, each array counted
once (by identity) and excluding the caller's own inputs and parameters. BPTT: the
whole rollout's residuals. MRBP replay: M_0..M_T plus the largest one-step pullback.
MRBP checkpoint: the checkpointed scan's residuals (the stacked carries) plus one step's
pullback, measured by one extra ``jax.vjp`` of step 0, because the backward's
recomputation lives inside XLA where no array can be counted. Sparse replay: boundary
states and memory vectors plus the largest one-chunk pullback.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._common import compute_dtype
from memcore.backends.jax.steps import memformer_step, sab_step, step_loss
from memcore.errors import MemcoreError
# The reference's entry checks, so every backend rejects bad input with the same message.
from memcore.reference.routing._checks import check_memformer, check_sab, reject_memformer_only
from memcore.routing_types import Loss, RoutingResult

__all__ = ["bptt", "mrbp", "sab_bptt", "sab_sparse_replay"]

_tree_add = functools.partial(jax.tree_util.tree_map, jnp.add)


def _bytes(arrays: Iterable[Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes of distinct arrays (by identity), skipping those in ``exclude``."""
    seen = {id(x) for x in jax.tree_util.tree_leaves(list(exclude))}
    total = 0
    for x in jax.tree_util.tree_leaves(list(arrays)):
        if id(x) not in seen and hasattr(x, "nbytes"):
            seen.add(id(x))
            total += int(x.nbytes)
    return total


def _weights(loss: Loss, t: int, dtype: Any) -> jax.Array:
    return jnp.asarray(loss.weights if loss.weights is not None else (1.0,) * t, dtype=compute_dtype(dtype))


def _vjp_driver(fn, params, state0, caller_inputs) -> tuple[Any, Any, Any, Any, int]:
    """jax.vjp of ``fn(params, state0) -> (loss, final)``: (loss, final, grads, d_state0, bytes)."""
    loss, pull, final = jax.vjp(fn, params, state0, has_aux=True)
    held = _bytes(jax.tree_util.tree_leaves(pull), exclude=(params, state0, caller_inputs))
    grads, d_state0 = pull(jnp.ones_like(loss))
    return loss, final, grads, d_state0, held


# ----------------------------------------------------------------------------- Memformer
def _mf_step_loss(params, memory, t, x, target, weight, reset, mask, *, config, kind, truncate_every):
    """One Memformer step and its weighted loss; M entering step t > 0 with t % k == 0 is cut."""
    if truncate_every is not None:
        cut = (t > 0) & (t % truncate_every == 0)
        memory = jnp.where(cut, lax.stop_gradient(memory), memory)
    m_next, y = memformer_step(params, x, memory, config=config, token_mask=mask, reset=reset)
    return m_next, weight * step_loss(params, y, target, kind)


_mf_step_jit = jax.jit(_mf_step_loss, static_argnames=("config", "kind", "truncate_every"))


@functools.partial(jax.jit, static_argnames=("config", "kind", "truncate_every", "remat"))
def _mf_unroll(params, memory0, xs, targets, weights, resets, token_mask, *, config, kind, truncate_every, remat):
    """(L, M_T) of a Memformer rollout as one lax.scan; ``remat`` checkpoints every step."""
    step = functools.partial(_mf_step_loss, config=config, kind=kind, truncate_every=truncate_every)
    if remat:
        # Saves nothing inside the step: the scan keeps only the step's inputs (the carry M_t).
        step = jax.checkpoint(step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)

    def body(memory, inp):
        t, x, target, weight, reset, mask = inp
        return step(params, memory, t, x, target, weight, reset, mask)

    ts = jnp.arange(xs.shape[0])
    m_last, losses = lax.scan(body, memory0, (ts, xs, targets, weights, resets, token_mask))
    return jnp.sum(losses), m_last


def _mf_rollout(params, xs, m0, targets, *, config, loss, resets, token_mask, truncate_every, remat):
    check_memformer(params, xs, m0, targets, config, loss, resets, token_mask, truncate_every)
    weights = _weights(loss, xs.shape[0], xs.dtype)

    def fn(p, m):
        return _mf_unroll(p, m, xs, targets, weights, resets, token_mask, config=config,
                          kind=loss.kind, truncate_every=truncate_every, remat=remat)

    caller = (xs, targets, resets, token_mask)
    value, final, grads, d_m0, held = _vjp_driver(fn, dict(params), m0, caller)
    if remat:
        held += _mf_step_residual_bytes(params, xs, m0, targets, weights, resets, token_mask,
                                        0, config, loss.kind, truncate_every)[1]
    return RoutingResult(float(value), grads, d_m0, final, held)


def _mf_step_residual_bytes(params, xs, memory, targets, weights, resets, token_mask, t, config, kind,
                            truncate_every, dm_next=None, exclude=()):
    """jax.vjp of step t from ``memory``: ((dparams, dM_t, loss_t) or None, residual bytes)."""

    def fn(p, m):
        return _mf_step_jit(p, m, jnp.asarray(t), xs[t], targets[t], weights[t],
                            None if resets is None else resets[t],
                            None if token_mask is None else token_mask[t],
                            config=config, kind=kind, truncate_every=truncate_every)

    (m_next, value), pull = jax.vjp(fn, dict(params), memory)
    held = _bytes(jax.tree_util.tree_leaves(pull), exclude=(params, memory, xs, targets, exclude))
    if dm_next is None:
        return None, held
    dp, dm = pull((dm_next, jnp.ones_like(value)))
    return (dp, dm, value), held


def _mrbp_replay(params, xs, m0, targets, *, config, loss, resets, token_mask, truncate_every):
    check_memformer(params, xs, m0, targets, config, loss, resets, token_mask, truncate_every)
    n = xs.shape[0]
    weights = _weights(loss, n, xs.dtype)
    memories = [m0]  # no-grad forward: only M_0..M_T are kept
    for t in range(n):
        m_next, _ = _mf_step_jit(params, memories[-1], jnp.asarray(t), xs[t], targets[t], weights[t],
                                 None if resets is None else resets[t],
                                 None if token_mask is None else token_mask[t],
                                 config=config, kind=loss.kind, truncate_every=truncate_every)
        memories.append(m_next)
    stored = _bytes(memories, exclude=(m0,)) + int(m0.nbytes)
    grads = jax.tree_util.tree_map(jnp.zeros_like, dict(params))
    dm = jnp.zeros_like(m0)  # the last step has no incoming memory gradient
    total, peak = 0.0, stored
    for t in range(n - 1, -1, -1):
        (dp, dm, value), held = _mf_step_residual_bytes(
            params, xs, memories[t], targets, weights, resets, token_mask, t, config, loss.kind,
            truncate_every, dm_next=dm, exclude=memories)
        peak = max(peak, stored + held)
        grads = _tree_add(grads, dp)
        total += float(value)
    return RoutingResult(total, grads, dm, memories[-1], peak)


# ----------------------------------------------------------------------------- SAB
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
        memories = jnp.stack(pool, axis=1) if pool else jnp.zeros((h.shape[0], 0, h.shape[1]), h.dtype)
        h, c, y = sab_step(params, xs[i], h, c, memories, config=config)
        total = total + weights[i] * step_loss(params, y, targets[i], kind)
        if t % config.k_att == 0:
            new.append(h)  # not detached: gradient reaching it flows back through its chunk
    return total, tuple(new), h, c


@functools.partial(jax.jit, static_argnames=("config", "kind", "truncate"))
def _sab_graph(params, state0, xs, targets, weights, *, config, kind, truncate):
    h0, c0 = state0
    prev = (h0,) if config.include_h0_memory else ()
    value, _, h, c = _sab_run(params, h0, c0, prev, xs, targets, weights, t_start=1,
                              config=config, kind=kind, truncate=truncate)
    return value, (h, c)


@functools.partial(jax.jit, static_argnames=("t_start", "config", "kind"))
def _sab_chunk(params, h, c, prev, xs, targets, weights, *, t_start, config, kind):
    value, new, h, c = _sab_run(params, h, c, prev, xs, targets, weights, t_start=t_start,
                                config=config, kind=kind, truncate=True)
    return (value, new), (h, c)


def _sab_whole(params, xs, state0, targets, *, config, loss, truncate):
    check_sab(params, xs, state0, targets, config, loss)
    weights = _weights(loss, xs.shape[0], xs.dtype)
    state0 = tuple(state0)

    def fn(p, s):
        return _sab_graph(p, s, xs, targets, weights, config=config, kind=loss.kind, truncate=truncate)

    value, final, grads, d_s0, held = _vjp_driver(fn, dict(params), state0, (xs, targets))
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
    weights = _weights(loss, n, xs.dtype)
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
        (value, new), (h, c) = _sab_chunk(params, h, c, tuple(mems), xs[lo:hi], targets[lo:hi],
                                          weights[lo:hi], t_start=lo + 1, config=config, kind=loss.kind)
        values.append(value)
        mems.extend(new)
        owner.extend([j] * len(new))
    stored = _bytes([b[:2] for b in boundary] + mems, exclude=(h0, c0)) + int(h0.nbytes + c0.nbytes)
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
            return _sab_chunk(p, hh, cc, prev, xs[lo:hi], targets[lo:hi], weights[lo:hi],
                              t_start=lo + 1, config=config, kind=loss.kind)[0]

        (value, new), pull = jax.vjp(fn, params, h_in, c_in, tuple(mems[:n_prev]))
        held = _bytes(jax.tree_util.tree_leaves(pull), exclude=(params, xs, targets, mems, boundary))
        peak = max(peak, stored + held)
        ct_new = tuple(d_mem[i] if d_mem[i] is not None else jnp.zeros_like(mems[i]) for i in mine)
        dp, dh, dc, d_prev = pull((jnp.ones_like(value), ct_new))
        grads = _tree_add(grads, dp)
        for i, g in enumerate(d_prev):
            d_mem[i] = g if d_mem[i] is None else d_mem[i] + g
        if j == 0:  # (h, c) entering chunk j > 0 are cut inside the chunk: dh = dc = 0 there
            dh0, dc0 = dh, dc
    if config.include_h0_memory and d_mem[0] is not None:
        dh0 = dh0 + d_mem[0]
    total = float(sum(float(v) for v in values))
    return RoutingResult(total, grads, (dh0, dc0), (h, c), peak, tuple(replayed))


# ----------------------------------------------------------------------------- public
def bptt(step, params, xs, state0, targets, *, config, loss=Loss(), resets=None, token_mask=None,
         truncate_every=None) -> RoutingResult:
    """Full BPTT of ``step`` ("memformer": one lax.scan; "sab": no chunk truncation).

    Args:
        step: "memformer" or "sab". params: dict name -> array (MEMFORMER_PARAMS or
            SAB_PARAMS, plus head_w for xent). xs: (T, B, L, D) or (T, B, I).
        state0: M_0 (B, K, D), or (h0, c0) each (B, Hd). targets: see the routing contract.
        resets: (T, B) bool; token_mask: (T, B, L) bool; truncate_every: k (memformer only).
    """
    if step == "memformer":
        return _mf_rollout(params, xs, state0, targets, config=config, loss=loss, resets=resets,
                           token_mask=token_mask, truncate_every=truncate_every, remat=False)
    if step == "sab":
        reject_memformer_only("sab", resets=resets, token_mask=token_mask, truncate_every=truncate_every)
        return _sab_whole(params, xs, state0, targets, config=config, loss=loss, truncate=False)
    raise MemcoreError(f"`step` must be 'memformer' or 'sab'. Received: step={step!r}")


def mrbp(params, xs, M0, targets, *, config, loss=Loss(), resets=None, token_mask=None,
         truncate_every=None, method: str = "checkpoint") -> RoutingResult:
    """Memformer MRBP (Alg. 1): the gradients of BPTT keeping only M_0..M_T.

    Args:
        params, xs (T, B, L, D), M0 (B, K, D), targets, resets, token_mask, truncate_every:
            as :func:`bptt` with step "memformer".
        method: "checkpoint" (lax.scan over jax.checkpoint-ed steps) or "replay"
            (python loop of per-step jax.vjp from the stored memories).
    """
    kw = dict(config=config, loss=loss, resets=resets, token_mask=token_mask, truncate_every=truncate_every)
    if method == "checkpoint":
        return _mf_rollout(params, xs, M0, targets, remat=True, **kw)
    if method == "replay":
        return _mrbp_replay(params, xs, M0, targets, **kw)
    raise MemcoreError(f"`method` must be 'checkpoint' or 'replay'. Received: method={method!r}")
