"""Model-agnostic MRBP in JAX: Memory Replay Back-Propagation over any user step.

``step(params, memory, segment) -> (loss_t, next_memory)`` is any pure function; ``memory``
any pytree of floating arrays (several memories, per-layer memories, models in series);
``segments`` a pytree of arrays with a leading T axis (segment t is every leaf's row t).
Three drivers with one signature return ``(L, dL/dparams, M_T)`` like
``jax.value_and_grad``, with ``L = loss_scale * sum_t loss_t`` and ``M_T`` under
``stop_gradient`` (the next rollout's ``memory0``):

* :func:`mrbp` (Memformer Alg. 1): a ``lax.scan`` forward that keeps only the memories
  M_0..M_{T-1} (the loss is dead code there and XLA drops it), then a reverse ``lax.scan``
  that recomputes segment t from M_t (``jax.vjp`` of ``step``) and carries dM. Memory:
  O(T |M|) stored memories plus one segment's residuals, never T segments' activations.
  ``offload="host"`` keeps the stored memories in pinned host memory (JAX memory kinds: a
  ``device_put`` to ``jax.memory.Space.Host`` in the forward body, back to the device in
  the backward body); on CPU both spaces are host memory and it changes nothing.
* :func:`bptt`: ``jax.value_and_grad`` of one ``lax.scan`` (every segment's residuals kept).
* :func:`checkpointed`: the same scan over ``jax.checkpoint(step)``: the baseline that
  rematerialises each segment by autodiff.

``truncate_every=k`` is routing.mrbp's cut (docs/semantics.md R.3): stop-gradient on the
memory entering segment t whenever t % k == 0, t > 0. ``horizon=h`` (sliding horizon,
docs/semantics.md "MRBP over a user step"): loss_t back-propagates through at most h
segments (t, t-1, ..., t-h+1); the memory entering segment t-h+1 is cut for that loss
(M_0 never is). MRBP carries h-1 memory cotangents, one per remaining depth, so a segment's
memory VJP runs h times instead of once; ``horizon >= T`` is plain MRBP.

``memory0`` is a pytree or a callable ``memory0(params) -> memory`` (e.g. normalize(v_bias)),
whose gradient joins ``grads``. Each driver is one ``jax.jit`` with the step, ``memory0``
callable and options static: pass the same ``step`` object to reuse the compiled program
(a fresh lambda per call compiles again); inside the caller's ``jit`` or ``vmap`` it inlines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._mrbp_checks import check_entry, check_memory, check_step_output
from memcore.errors import MemcoreError

__all__ = ["bptt", "checkpointed", "mrbp"]

_tree_add = functools.partial(jax.tree_util.tree_map, jnp.add)
_STATIC = ("step", "m0_fn", "truncate_every", "horizon", "offload")


def _cut(t: jax.Array, k: int) -> jax.Array:
    """True where the memory entering segment t is cut (t % k == 0, t > 0)."""
    return (t > 0) & (t % k == 0)


def _zero_at_cut(t: jax.Array, k: int | None, tree: Any) -> Any:
    """The cotangent on M_t, zeroed where M_t is cut (unchanged without truncation)."""
    if k is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.where(_cut(t, k), jnp.zeros_like(x), x), tree)


def _stop_at_cut(t: jax.Array, k: int | None, tree: Any) -> Any:
    """M_t under stop_gradient where it is cut (unchanged without truncation)."""
    if k is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.where(_cut(t, k), lax.stop_gradient(x), x), tree)


def _start(params: Any, memory0: Any, m0_fn: Callable | None) -> tuple[Any, Callable | None]:
    """(M_0, pullback of memory0(params) or None)."""
    if m0_fn is None:
        return memory0, None
    m0, pull = jax.vjp(m0_fn, params)
    check_memory(m0, "memory0(params)")
    return m0, pull


def _to(space: Any, tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, space), tree)


# ----------------------------------------------------------------------------- MRBP
@functools.partial(jax.jit, static_argnames=_STATIC)
def _mrbp(params, memory0, segments, loss_scale, *, step, m0_fn, truncate_every, horizon, offload):
    T = jax.tree_util.tree_leaves(segments)[0].shape[0]
    m0, m0_pull = _start(params, memory0, m0_fn)
    host = offload == "host"

    def forward(m, seg):  # the loss is unused here: XLA removes it (and the head)
        _, m_next = check_step_output(step(params, m, seg), m)
        return m_next, (_to(jax.memory.Space.Host, m) if host else m)

    m_last, stored = lax.scan(forward, m0, segments)  # stored[t] = M_t, t < T
    sliding = horizon is not None and horizon < T

    def backward(carry, inp):
        t, m_t, seg = inp
        if host:
            m_t = _to(jax.memory.Space.Device, m_t)
        (loss, _), pull = jax.vjp(lambda p, m: step(p, m, seg), params, m_t)
        one = jnp.asarray(loss_scale, loss.dtype)
        if not sliding:
            dm, acc = carry
            dp, dm_t = pull((one, dm))
            return (_zero_at_cut(t, truncate_every, dm_t), _tree_add(acc, dp)), loss
        # Sliding horizon: buckets[j] holds the cotangent on M_{t+1} of the losses that may
        # still cross j + 1 segments. All of them cross segment t (one VJP for the params);
        # each moves down one bucket, bucket 0 stops at M_t, and loss_t enters the top one.
        buckets, _, acc = carry
        total = jax.tree_util.tree_map(lambda b: jnp.sum(b, axis=0), buckets)
        dp, dm_full = pull((one, total))
        shifted = jax.tree_util.tree_map(
            lambda b: jnp.concatenate([b[1:], jnp.zeros_like(b[:1])]), buckets
        )
        top = jnp.arange(horizon - 1) == horizon - 2  # empty when horizon == 1
        losses_in = jnp.where(top, one, jnp.zeros((), loss.dtype))
        moved = jax.vmap(lambda c, d: pull((c, d))[1])(losses_in, shifted)
        moved = _zero_at_cut(t, truncate_every, moved)
        return (moved, dm_full, _tree_add(acc, dp)), loss

    zeros_p = jax.tree_util.tree_map(jnp.zeros_like, params)
    zeros_m = jax.tree_util.tree_map(jnp.zeros_like, m0)
    if sliding:
        empty = jax.tree_util.tree_map(lambda x: jnp.zeros((horizon - 1, *x.shape), x.dtype), m0)
        init = (empty, zeros_m, zeros_p)
    else:
        init = (zeros_m, zeros_p)
    carry, losses = lax.scan(backward, init, (jnp.arange(T), stored, segments), reverse=True)
    dm0, grads = carry[-2], carry[-1]  # dm0: the whole cotangent on M_0 (M_0 is never cut)
    if m0_pull is not None:
        grads = _tree_add(grads, m0_pull(dm0)[0])
    loss = jnp.sum(losses) * jnp.asarray(loss_scale, losses.dtype)
    return loss, grads, lax.stop_gradient(m_last)


# ----------------------------------------------------------------------------- baselines
def _scan_total(p, memory0, segments, loss_scale, *, step, m0_fn, truncate_every, remat):
    """(L, M_T) of one lax.scan, differentiable in p."""
    m0 = memory0 if m0_fn is None else m0_fn(p)
    if m0_fn is not None:
        check_memory(m0, "memory0(params)")
    body_step = jax.checkpoint(step, prevent_cse=False) if remat else step

    def body(m, inp):
        t, seg = inp
        m = _stop_at_cut(t, truncate_every, m)
        loss, m_next = check_step_output(body_step(p, m, seg), m)
        return m_next, loss

    T = jax.tree_util.tree_leaves(segments)[0].shape[0]
    m_last, losses = lax.scan(body, m0, (jnp.arange(T), segments))
    return jnp.sum(losses) * jnp.asarray(loss_scale, losses.dtype), m_last


def _unrolled_total(p, memory0, segments, loss_scale, *, step, m0_fn, truncate_every, horizon):
    """(L, M_T) by the sliding-horizon definition, unrolled: O(T * horizon) steps."""
    T = jax.tree_util.tree_leaves(segments)[0].shape[0]
    seg = lambda t: jax.tree_util.tree_map(lambda x: x[t], segments)  # noqa: E731
    m0 = memory0 if m0_fn is None else m0_fn(p)
    ms = [m0]
    for t in range(T):
        ms.append(check_step_output(step(p, ms[-1], seg(t)), ms[-1])[1])
    total = 0.0
    for t in range(T):
        start = max(t - horizon + 1, 0 if truncate_every is None else t - t % truncate_every)
        m = ms[0] if start == 0 else lax.stop_gradient(ms[start])
        for u in range(start, t):
            m = step(p, m, seg(u))[1]
        total = total + step(p, m, seg(t))[0]
    return total * jnp.asarray(loss_scale, jnp.result_type(total)), ms[-1]


@functools.partial(jax.jit, static_argnames=(*_STATIC, "remat"))
def _autodiff(params, memory0, segments, loss_scale, *, step, m0_fn, truncate_every, horizon,
              offload, remat):  # fmt: skip
    del offload  # rejected at entry
    T = jax.tree_util.tree_leaves(segments)[0].shape[0]
    kw = dict(step=step, m0_fn=m0_fn, truncate_every=truncate_every)
    if horizon is not None and horizon < T:
        total = functools.partial(_unrolled_total, horizon=horizon, **kw)
    else:
        total = functools.partial(_scan_total, remat=remat, **kw)
    (loss, m_last), grads = jax.value_and_grad(total, has_aux=True)(
        params, memory0, segments, loss_scale
    )
    return loss, grads, lax.stop_gradient(m_last)


# ----------------------------------------------------------------------------- public
def _run(driver, name, step, params, memory0, segments, truncate_every, horizon, offload,
         loss_scale, **extra):  # fmt: skip
    check_entry(
        step, params, memory0, segments, truncate_every=truncate_every, horizon=horizon,
        offload=offload, loss_scale=loss_scale,
    )  # fmt: skip
    if offload is not None and name != "mrbp":
        raise MemcoreError(
            f"`offload` is an option of mrbp only ({name} keeps no stored memories to "
            f"offload). Received: offload={offload!r}"
        )
    m0_fn = memory0 if callable(memory0) else None
    return driver(
        params, None if m0_fn else memory0, segments, loss_scale, step=step, m0_fn=m0_fn,
        truncate_every=truncate_every, horizon=horizon, offload=offload, **extra,
    )  # fmt: skip


def mrbp(step, params, memory0, segments, *, truncate_every=None, horizon=None, offload=None,
         loss_scale=1.0):  # fmt: skip
    """MRBP over a user step: BPTT's loss and gradients, keeping only M_0..M_{T-1}.

    Args:
        step: ``step(params, memory, segment) -> (loss_t (), next_memory)``, pure; static
            (hashable; the same object reuses the compiled program).
        params: a pytree of floating arrays; ``grads`` has its structure and dtypes
            (accumulated in the params' dtype).
        memory0: M_0, a pytree of floating arrays (e.g. (B, K, D) per memory), or a
            callable ``memory0(params) -> M_0`` whose gradient joins ``grads``.
        segments: a pytree of arrays with a leading T axis, e.g. ``(tokens, targets)``
            each (T, B, L).
        truncate_every: k: cut the memory entering segment t when t % k == 0, t > 0.
        horizon: h: loss_t back-propagates through at most h segments (module docstring).
        offload: None, or "host": stored memories in pinned host memory.
        loss_scale: scalar s in L = s * sum_t loss_t (e.g. 1 / accumulation steps).

    Returns:
        (L (), dL/dparams, M_T with stop_gradient).
    """
    return _run(_mrbp, "mrbp", step, params, memory0, segments, truncate_every, horizon,
                offload, loss_scale)  # fmt: skip


def bptt(step, params, memory0, segments, *, truncate_every=None, horizon=None, offload=None,
         loss_scale=1.0):  # fmt: skip
    """Full BPTT of the same graph (:func:`mrbp`'s arguments; ``offload`` must be None).

    One ``lax.scan`` under ``jax.value_and_grad``; with ``horizon < T`` the sliding-horizon
    definition itself, unrolled (T * horizon steps): a reference for tests, not for speed.
    """
    return _run(_autodiff, "bptt", step, params, memory0, segments, truncate_every, horizon,
                offload, loss_scale, remat=False)  # fmt: skip


def checkpointed(step, params, memory0, segments, *, truncate_every=None, horizon=None,
                 offload=None, loss_scale=1.0):  # fmt: skip
    """BPTT over ``jax.checkpoint(step)`` per segment (:func:`mrbp`'s arguments).

    ``horizon`` must be None or >= T and ``offload`` None: the checkpointed scan has one
    memory cotangent and saves only the scan's carries.
    """
    T = check_entry(
        step, params, memory0, segments, truncate_every=truncate_every, horizon=horizon,
        offload=offload, loss_scale=loss_scale,
    )  # fmt: skip
    if horizon is not None and horizon < T:
        raise MemcoreError(
            f"`horizon` < T is supported by mrbp and bptt, not checkpointed. "
            f"Received: horizon={horizon}, T={T}"
        )
    return _run(_autodiff, "checkpointed", step, params, memory0, segments, truncate_every,
                horizon, offload, loss_scale, remat=True)  # fmt: skip
