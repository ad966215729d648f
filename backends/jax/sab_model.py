"""SAB around any recurrent cell in JAX: full BPTT, ``sab_bptt`` and sparse replay, compiled.

A :class:`SabNet` is a user's cell ``cell(params, x_t, (h, aux)) -> (h_hat, aux')`` and a
readout ``readout(params, h, s) -> y_t`` (see :mod:`memcore.backends.jax.sab_cells`;
memcore's LSTM is :data:`LSTM_NET`). Around the cell, step t (1-based) reads the memories
with memcore's sparse retrieval, ``h = h_hat + s``, ``y_t = readout(params, h, s)``, and
a write step (``t % k_att == 0``) stores ``h`` (not detached) in the preallocated bank of
:mod:`memcore.backends.jax.sab_bank`. ``params`` is one pytree (a mapping holding the
scorer's weights, w1 w2 w3 for the paper's scorer, next to the cell's and readout's).

Every driver is one compiled program per shape and static settings: the forward is a
``lax.scan`` over time; sparse replay is a ``lax.scan`` over chunks for its forward (kept:
only (h, aux) entering each chunk and the bank) and a reverse ``lax.scan`` over chunks that
recomputes one chunk under ``jax.vjp`` (its start step t is traced, never static), so the
memory held is the bank, the chunk boundaries and one chunk's residuals, whatever T.

Gradients (docs/semantics.md R.3, R.5, R.6): ``sab_full_bptt`` differentiates the forward
with the step's own stop-gradients (threshold unless ``threshold_grad``, scorer inputs with
``block_score_grad``); ``sab_bptt`` adds one on (h, aux) entering each step t > 1 with
``(t - 1) % k_trunc == trunc_phase`` (:func:`trunc_phase`; 0 is memcore's rule);
``sab_sparse_replay`` computes ``sab_bptt``'s gradient chunk by chunk, skipping a chunk
with no non-zero loss weight and no non-zero gradient on the memories it wrote.

The drivers are pure and jitted (``net``, ``config`` and ``loss`` static; SABConfig is a
frozen attrs class, so it hashes) and return ``(loss, grads, final_state)`` like
``jax.value_and_grad``; ``state_grad=True`` makes ``grads`` the pair (d params, d state0).
``loss`` is "mse", "xent" (logits ``y @ params["head_w"]``) or a function
``loss(params, y_t, target_t) -> scalar``; the total is ``sum_t weights[t] * loss_t``.
``unroll`` (static) is the scans' steps per loop iteration: fewer, larger loop bodies,
which GPUs run with less per-iteration overhead, for a longer compile.

Shapes: xs (T, B, I); state0 (h0 (B, Hd), aux0); targets (T, B, O) or (T, B) ints;
weights (T,) or None (all ones).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._common import compute_dtype
from memcore.backends.jax.sab_bank import (
    Retrieval,
    bank_init,
    bank_read,
    bank_slots,
    bank_write,
    memories_before,
    retrieval,
)
from memcore.backends.jax.sab_cells import gru_cell_fn, linear_readout, lstm_cell_fn
from memcore.backends.jax.steps import step_loss
from memcore.errors import MemcoreError

__all__ = [
    "GRU_NET",
    "LSTM_NET",
    "ReplayResult",
    "SabNet",
    "chunk_layout",
    "replay_core",
    "rollout_loss",
    "sab_bptt",
    "sab_full_bptt",
    "sab_outputs",
    "sab_sparse_replay",
    "trunc_phase",
]

tree_map = jax.tree_util.tree_map


@attrs.frozen
class SabNet:
    """A recurrent cell and its readout (hashable, so it can be a static jit argument).

    Attributes:
        cell: ``cell(params, x_t (B, I), (h, aux)) -> (h_hat (B, Hd), aux')``.
        readout: ``readout(params, h (B, Hd), s (B, Hd)) -> y_t (B, O)``.
    """

    cell: Callable[..., Any]
    readout: Callable[..., Any] = linear_readout


LSTM_NET = SabNet(lstm_cell_fn)
GRU_NET = SabNet(gru_cell_fn)


def trunc_phase(config: Any) -> int:
    """The truncation phase p: (h, aux) is cut entering t > 1 with (t - 1) % k_trunc == p.

    ``config.trunc_phase`` when the config has it, else 0 (memcore's chunks 1 + m k_trunc).
    """
    p = getattr(config, "trunc_phase", 0)
    ok = isinstance(p, int) and not isinstance(p, bool) and 0 <= p < config.k_trunc
    if not ok:
        raise MemcoreError(
            f"`config.trunc_phase` must be an integer in [0, k_trunc) = [0, {config.k_trunc}). "
            f"Received: trunc_phase={p!r}"
        )
    return p


def _step_loss(loss: Any, params: Any, y: jax.Array, target: jax.Array) -> jax.Array:
    return loss(params, y, target) if callable(loss) else step_loss(params, y, target, loss)


def _step(net, rt, config, truncate, params, carry, x, t, valid=None):
    """One SAB step: (h, aux, bank, keys) and x_t (B, I) at step t -> (carry', y_t).

    ``valid`` is None (every step real) or a traced bool: a padding step leaves the carry
    as it was and writes nothing (its loss weight must be 0).
    """
    h, aux, bank, keys = carry
    if truncate:  # chunked truncated BPTT: only (h, aux) are cut; memory edges stay
        cut = (t > 1) & ((t - 1) % config.k_trunc == trunc_phase(config))
        h, aux = tree_map(lambda v: jnp.where(cut, lax.stop_gradient(v), v), (h, aux))
    h_hat, aux_new = net.cell(params, x, (h, aux))
    n = memories_before(t, config)
    s = bank_read(rt, params, h_hat, bank, keys, n, config)
    h_new = h_hat + s
    y = net.readout(params, h_new, s)
    write = t % config.k_att == 0
    if valid is not None:
        write = write & valid
        h_new, aux_new = tree_map(lambda a, b: jnp.where(valid, a, b), (h_new, aux_new), (h, aux))
    bank, keys = bank_write(rt, params, bank, keys, h_new, n, write, config)
    return (h_new, aux_new, bank, keys), y


def _weights(weights: Any, xs: jax.Array) -> jax.Array:
    dtype = compute_dtype(xs.dtype)
    if weights is None:
        return jnp.ones((xs.shape[0],), dtype)
    return jnp.asarray(weights, dtype)


def rollout_loss(net, params, state0, xs, targets, weights, *, config, loss, truncate, unroll=1):
    """L = sum_t weights[t] l_t of the SAB forward as one ``lax.scan``; returns (L, final).

    ``truncate`` cuts (h, aux) at the chunk starts (sab_bptt); otherwise no chunk cut.
    ``unroll``: steps per loop iteration of the scan (fewer, larger loop bodies on GPUs).
    """
    rt = retrieval(config)
    h0, aux0 = state0
    bank, keys = bank_init(rt, params, h0, bank_slots(xs.shape[0], config), config)
    ts = jnp.arange(1, xs.shape[0] + 1, dtype=jnp.int32)

    def body(carry, inp):
        x, t, target, weight = inp
        carry, y = _step(net, rt, config, truncate, params, carry, x, t)
        return carry, weight * _step_loss(loss, params, y, target)

    carry = (h0, aux0, bank, keys)
    (h, aux, _, _), values = lax.scan(body, carry, (xs, ts, targets, weights), unroll=unroll)
    return jnp.sum(values), (h, aux)


def _value_and_grad(net, params, xs, state0, targets, weights, config, loss, truncate, opts):
    state_grad, unroll = opts

    def fn(p, s0):
        return rollout_loss(
            net, p, s0, xs, targets, _weights(weights, xs), config=config, loss=loss,
            truncate=truncate, unroll=unroll,
        )  # fmt: skip

    (value, final), (dp, ds0) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        params, state0
    )
    return value, ((dp, ds0) if state_grad else dp), final


_STATIC = ("net", "config", "loss", "state_grad", "unroll")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sab_full_bptt(
    net, params, xs, state0, targets, weights=None, *, config, loss="mse", state_grad=False,
    unroll=1,
):  # fmt: skip
    """Plain BPTT of the SAB forward (no chunk cut; config.k_trunc is ignored).

    Returns:
        (loss (), grads like params, or (d params, d state0) with ``state_grad``,
        final_state (h_T, aux_T)).
    """
    args = (net, params, xs, state0, targets, weights, config, loss)
    return _value_and_grad(*args, False, (state_grad, unroll))


@functools.partial(jax.jit, static_argnames=_STATIC)
def sab_bptt(
    net, params, xs, state0, targets, weights=None, *, config, loss="mse", state_grad=False,
    unroll=1,
):  # fmt: skip
    """The SAB gradient on the whole masked graph: (h, aux) cut at every chunk start.

    Returns: as :func:`sab_full_bptt`.
    """
    args = (net, params, xs, state0, targets, weights, config, loss)
    return _value_and_grad(*args, True, (state_grad, unroll))


# ----------------------------------------------------------------------------- sparse replay
def chunk_layout(steps: int, k_trunc: int, phase: int) -> tuple[int, int, int]:
    """(front, L, C): the chunks (cut points t > 1 with (t - 1) % k_trunc == phase), each
    padded to L steps, C of them; ``front`` padding steps come before step 1 so that chunk
    j starts at padded index j L."""
    starts = [1] + [t for t in range(2, steps + 1) if (t - 1) % k_trunc == phase]
    lengths = [b - a for a, b in zip(starts, starts[1:] + [steps + 1])]
    size = max(lengths)
    return size - lengths[0], size, len(starts)


class ReplayResult(NamedTuple):
    """Sparse replay's outputs: loss (); grads like params; d_state0 (dh0, d aux0);
    final_state (h_T, aux_T); replayed (C,) bool, chunk order; bank (B, N_max, Hd) as written."""

    loss: jax.Array
    grads: Any
    d_state0: Any
    final_state: Any
    replayed: jax.Array
    bank: jax.Array


def _pad_chunks(arr: jax.Array, front: int, size: int, count: int) -> jax.Array:
    """(T, ...) -> (C, L, ...) with zeros before step 1 and after step T."""
    back = count * size - front - arr.shape[0]
    arr = jnp.pad(arr, [(front, back)] + [(0, 0)] * (arr.ndim - 1))
    return arr.reshape((count, size) + arr.shape[1:])


def _run_chunk(net, rt, config, loss, unroll, params, h, aux, bank, keys, chunk):
    """One chunk (L steps, padding masked) from (h, aux) with the bank: (L_chunk, carry)."""

    def body(carry, inp):
        x, t, target, weight, valid = inp
        carry, y = _step(net, rt, config, True, params, carry, x, t, valid)
        return carry, weight * _step_loss(loss, params, y, target)

    carry, values = lax.scan(body, (h, aux, bank, keys), chunk, unroll=unroll)
    return jnp.sum(values), carry


@functools.partial(jax.jit, static_argnames=("net", "config", "loss", "unroll", "skip"))
def replay_core(
    net, params, xs, state0, targets, weights=None, *, config, loss="mse", unroll=1, skip=True
):
    """Sparse replay (docs/semantics.md R.6) as two scans over chunks: a :class:`ReplayResult`.

    ``unroll``: steps per loop iteration inside a chunk. ``skip=False`` replays every chunk
    without testing (same gradients; no conditional, for losses that weight every step).
    """
    rt: Retrieval = retrieval(config)
    steps = xs.shape[0]
    front, size, count = chunk_layout(steps, config.k_trunc, trunc_phase(config))
    slots = bank_slots(steps, config)
    ts = jnp.arange(1 - front, 1 - front + count * size, dtype=jnp.int32)
    chunks = (
        _pad_chunks(xs, front, size, count),
        ts.reshape(count, size),
        _pad_chunks(targets, front, size, count),
        _pad_chunks(_weights(weights, xs), front, size, count),
        ((ts >= 1) & (ts <= steps)).reshape(count, size),
    )
    # Slots chunk j writes: [n(t_j), n(t_{j+1})) with t_j its first real step.
    first = jnp.clip(ts.reshape(count, size)[:, 0], 1, steps + 1)
    lo = memories_before(first, config)
    hi = jnp.concatenate([lo[1:], jnp.full((1,), slots, lo.dtype)])
    h0, aux0 = state0
    bank0, keys0 = bank_init(rt, params, h0, slots, config)
    run = functools.partial(_run_chunk, net, rt, config, loss, min(unroll, size))

    def forward(carry, chunk):  # no caches kept: only the state entering each chunk
        h, aux, bank, keys = carry
        value, carry = run(params, h, aux, bank, keys, chunk)
        return carry, ((h, aux), value)

    (h_t, aux_t, bank, keys), (bounds, values) = lax.scan(
        forward, (h0, aux0, bank0, keys0), chunks
    )
    zero_state = tree_map(jnp.zeros_like, (h0, aux0))
    slot = jnp.arange(slots)

    def backward(carry, inp):
        grads, d_bank, d_keys, _ = carry
        (h, aux), chunk, a, b = inp
        mine = ((slot >= a) & (slot < b))[None, :, None]
        wanted = (
            jnp.any(chunk[3] != 0) | jnp.any(mine & (d_bank != 0)) | jnp.any(mine & (d_keys != 0))
        )

        def replay(_):
            def fn(p, hh, aa, bk, ky):
                return run(p, hh, aa, bk, ky, chunk)

            (value, _), pull = jax.vjp(fn, params, h, aux, bank, keys)
            # No gradient enters the chunk's last (h, aux); its memories get theirs.
            ct_out = (*zero_state, d_bank, d_keys)
            dp, dh, daux, dbk, dky = pull((jnp.ones_like(value), ct_out))
            return (tree_map(jnp.add, grads, dp), dbk, dky, (dh, daux))

        def skip_chunk(_):
            return (grads, d_bank, d_keys, zero_state)

        if not skip:
            return replay(None), jnp.ones((), bool)
        return lax.cond(wanted, replay, skip_chunk, None), wanted

    grads0 = tree_map(jnp.zeros_like, params)
    init = (grads0, jnp.zeros_like(bank), jnp.zeros_like(keys), zero_state)
    (grads, d_bank, d_keys, (dh0, daux0)), replayed = lax.scan(
        backward, init, (bounds, chunks, lo, hi), reverse=True
    )
    if config.include_h0_memory and slots:  # h0 is memory 0: its reads reach the initial state
        _, pull = jax.vjp(lambda p, hh: bank_init(rt, p, hh, slots, config), params, h0)
        dp, dh = pull((d_bank, d_keys))
        grads, dh0 = tree_map(jnp.add, grads, dp), dh0 + dh
    return ReplayResult(jnp.sum(values), grads, (dh0, daux0), (h_t, aux_t), replayed, bank)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "skip"))
def sab_sparse_replay(
    net, params, xs, state0, targets, weights=None, *, config, loss="mse", state_grad=False,
    unroll=1, skip=True,
):  # fmt: skip
    """Sparse replay: :func:`sab_bptt`'s gradient holding one chunk's residuals at a time.

    ``skip=False`` replays every chunk without testing whether it receives gradient.

    Returns: as :func:`sab_full_bptt`.
    """
    r = replay_core(
        net, params, xs, state0, targets, weights, config=config, loss=loss, unroll=unroll,
        skip=skip,
    )  # fmt: skip
    return r.loss, ((r.grads, r.d_state0) if state_grad else r.grads), r.final_state


# ----------------------------------------------------------------------------- forward only
@functools.partial(jax.jit, static_argnames=("net", "config", "first", "segments", "unroll"))
def sab_outputs(net, params, xs, state0, *, config, first=0, segments=4, unroll=1):
    """The SAB forward alone: (ys (T - first, B, O), final_state).

    Steps before ``first`` (0-based) keep no output, so a long rollout scored on its last
    steps holds no (T, B, O). The steps run as about ``segments`` scans (one compile each,
    all in one program), each over a bank only as large as the memories written by its end
    (the bank grows between scans), so a step scores the slots that can be live, not all
    N_max: (1 + 1 / segments) / 2 of the work at large T.
    """
    rt = retrieval(config)
    steps = xs.shape[0]
    if not 0 <= first < steps:
        raise MemcoreError(f"`first` must be in [0, T) = [0, {steps}). Received: first={first!r}")
    h0, aux0 = state0
    cuts = sorted({0, first, steps} | {steps * g // segments for g in range(1, segments)})
    bank, keys = bank_init(rt, params, h0, bank_slots(cuts[1], config), config)
    carry, ys = (h0, aux0, bank, keys), []

    def body(carry, inp):
        x, t = inp
        return _step(net, rt, config, False, params, carry, x, t)

    def body_quiet(carry, inp):
        return body(carry, inp)[0], None

    for a, b in itertools.pairwise(cuts):
        h, aux, bank, keys = carry
        grow = bank_slots(b, config) - bank.shape[1]
        bank = jnp.pad(bank, ((0, 0), (0, grow), (0, 0)))
        keys = jnp.pad(keys, ((0, 0), (0, grow), (0, 0)))
        ts = jnp.arange(a + 1, b + 1, dtype=jnp.int32)
        fn = body if a >= first else body_quiet
        carry, y = lax.scan(fn, (h, aux, bank, keys), (xs[a:b], ts), unroll=min(unroll, b - a))
        if a >= first:
            ys.append(y)
    h, aux, _, _ = carry
    return jnp.concatenate(ys, axis=0), (h, aux)
