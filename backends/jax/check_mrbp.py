"""The JAX half of :func:`memcore.check_mrbp`: one user step run by MRBP and by BPTT in float64.

BPTT is ``jax.value_and_grad`` over a Python loop of the same step (no scan, no remat:
the plain definition MRBP must match); MRBP is
:func:`memcore.backends.jax.mrbp_model.mrbp`. Params and inputs are cast to float64 (JAX
arrays are immutable, so the user's are untouched), which needs x64 mode: without it JAX
silently computes in float32, so memcore refuses instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memcore.check_model import Run, window_start
from memcore.errors import MemcoreError

__all__ = ["param_names", "require_x64", "run_both", "segment_count"]


def require_x64() -> None:
    """MemcoreError unless JAX runs with float64 enabled."""
    if not jax.config.read("jax_enable_x64"):
        raise MemcoreError(
            "JAX must run with float64 enabled to check gradients at rtol 1e-10: set "
            "JAX_ENABLE_X64=1 before importing jax, or call "
            "jax.config.update('jax_enable_x64', True) first. Received: jax_enable_x64=False"
        )


def _to64(tree: Any) -> Any:
    def cast(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype=jnp.float64)
        return x

    return jax.tree_util.tree_map(cast, tree)


def param_names(params: Any) -> list[str]:
    """Dotted names of the leaves of ``params``, in flattening order ({"a": {"w": x}} -> "a.w")."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path, simple=True, separator=".") or "params" for path, _ in flat]


def _numpy_by_name(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves(tree)
    return {n: np.asarray(x, dtype=np.float64) for n, x in zip(param_names(tree), leaves)}


def _memory_leaves(m: Any) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.float64) for x in jax.tree_util.tree_leaves(m)]


def segment_count(segments: Any) -> int:
    """T, the leading axis every leaf of ``segments`` shares."""
    leaves = jax.tree_util.tree_leaves(segments)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise MemcoreError(
            "`segments` must be a pytree of arrays sharing a leading T axis. "
            f"Received: leading sizes {sorted(map(str, sizes))}"
        )
    return sizes.pop()


@functools.lru_cache(maxsize=16)
def _bptt_program(step, m0_fn, T, truncate_every, horizon):
    """(params, memory0, segments) -> ((L, M_T), dL/dparams), jitted once per model and cut.

    The loop is unrolled in Python (no scan, no remat), under one ``jax.jit``: eager, every
    op would compile on its own, which is slower the first time.
    """

    def total(p, memory0, segments):
        segs = [jax.tree_util.tree_map(lambda x, t=t: x[t], segments) for t in range(T)]
        m0 = m0_fn(p) if m0_fn is not None else memory0
        losses = []
        if horizon is None:  # one unroll, cut where truncate_every says
            m = m0
            for t in range(T):
                if truncate_every is not None and t > 0 and t % truncate_every == 0:
                    m = jax.lax.stop_gradient(m)
                loss_t, m = step(p, m, segs[t])
                losses.append(loss_t)
            return sum(losses), m
        ms = [m0]  # the definition itself: loss t through its own window, from a cut memory
        for t in range(T):
            ms.append(step(p, ms[-1], segs[t])[1])
        for t in range(T):
            w = window_start(t, truncate_every, horizon)
            m = m0 if w == 0 else jax.lax.stop_gradient(ms[w])
            for s in range(w, t + 1):
                loss_t, m = step(p, m, segs[s])
            losses.append(loss_t)
        return sum(losses), jax.lax.stop_gradient(ms[T])

    return jax.jit(jax.value_and_grad(total, has_aux=True))


def _bptt(step, params, memory0, segments, truncate_every, horizon) -> Run:
    T = segment_count(segments)
    m0_fn = memory0 if callable(memory0) else None
    try:
        program = _bptt_program(step, m0_fn, T, truncate_every, horizon)
    except TypeError:  # an unhashable step or memory0: compile for this call only
        program = _bptt_program.__wrapped__(step, m0_fn, T, truncate_every, horizon)
    (loss, m), grads = program(params, None if m0_fn else memory0, segments)
    return Run(float(loss), _numpy_by_name(grads), _numpy_by_name(params), _memory_leaves(m))


def _default_mrbp() -> Callable:
    from memcore.backends.jax.mrbp_model import mrbp

    return mrbp


def run_both(
    step: Callable,
    params: Any,
    memory0: Any,
    segments: Any,
    *,
    truncate_every: int | None = None,
    horizon: int | None = None,
    mrbp: Callable | None = None,
) -> tuple[Run, Run, str]:
    """(BPTT run, MRBP run, device) of ``step`` in float64; see :func:`memcore.check_mrbp`.

    Args:
        step: ``step(params, memory, segment) -> (loss_t, next_memory)``, pure.
        params: a pytree of arrays (the gradients' structure).
        memory0: a pytree of arrays, or ``memory0(params) -> memory``.
        segments: a pytree of arrays with a leading T axis.
        truncate_every: k: stop-gradient on the memory entering segment t when t % k == 0, t > 0.
        horizon: h: loss t back-propagates through segments w_t..t only (docs/semantics.md R.4b).
        mrbp: the MRBP driver (default: the library's).
    """
    require_x64()
    if not callable(step):
        raise MemcoreError(
            "`step` must be a callable step(params, memory, segment) -> (loss, next_memory). "
            f"Received: {type(step).__name__}"
        )
    if params is None:
        raise MemcoreError(
            "`params` must be given for framework='jax' (a pytree of arrays). Received: None"
        )
    p64 = _to64(params)
    m0 = memory0 if callable(memory0) else _to64(memory0)
    segs = _to64(segments)
    bptt = _bptt(step, p64, m0, segs, truncate_every, horizon)
    driver = mrbp or _default_mrbp()
    loss, grads, memory = driver(
        step, p64, m0, segs, truncate_every=truncate_every, horizon=horizon
    )
    out = Run(float(loss), _numpy_by_name(grads), _numpy_by_name(p64), _memory_leaves(memory))
    devices = {str(d) for x in jax.tree_util.tree_leaves(p64) for d in x.devices()}
    return bptt, out, ",".join(sorted(devices)) or "cpu"
