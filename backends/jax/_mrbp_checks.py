"""Entry checks of the model-agnostic JAX drivers (:mod:`memcore.backends.jax.mrbp_model`).

Everything here reads shapes and dtypes only, so it runs the same on concrete arrays and on
tracers (inside the caller's ``jax.jit`` or ``jax.vmap``). Messages follow docs/semantics.md
§4: the argument, what was expected, what was received.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from memcore.errors import MemcoreError

__all__ = ["OFFLOAD_CHOICES", "check_entry", "check_memory", "check_step_output"]

OFFLOAD_CHOICES = (None, "host")


def _path(path: Any) -> str:
    return jax.tree_util.keystr(path) or "(root)"


def _check_arrays(name: str, tree: Any, *, floating: bool) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise MemcoreError(
                f"`{name}` must be a pytree of arrays. "
                f"Received: {name}{_path(path)} of type {type(leaf).__name__}"
            )
        if floating and not jnp.issubdtype(dtype, jnp.inexact):
            raise MemcoreError(
                f"`{name}` leaves must be floating arrays (they are differentiated). "
                f"Received: {name}{_path(path)}.dtype={dtype}"
            )


def _check_int_option(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MemcoreError(f"`{name}` must be None or an integer >= 1. Received: {name}={value!r}")


def check_memory(memory: Any, name: str = "memory0") -> None:
    """MemcoreError unless ``memory`` is a pytree of floating arrays."""
    _check_arrays(name, memory, floating=True)


def check_entry(
    step: Any,
    params: Any,
    memory0: Any,
    segments: Any,
    *,
    truncate_every: Any,
    horizon: Any,
    offload: Any,
    loss_scale: Any,
) -> int:
    """Validate a driver's arguments; returns T, the segments' shared leading size."""
    if not callable(step):
        raise MemcoreError(
            "`step` must be a callable step(params, memory, segment) -> (loss, next_memory). "
            f"Received: {type(step).__name__}"
        )
    _check_arrays("params", params, floating=True)
    if not callable(memory0):
        check_memory(memory0)
    _check_arrays("segments", segments, floating=False)
    leaves = jax.tree_util.tree_flatten_with_path(segments)[0]
    if not leaves:
        raise MemcoreError("`segments` must hold at least one array. Received: an empty pytree")
    sizes = {_path(p): (x.shape[0] if len(x.shape) else None) for p, x in leaves}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise MemcoreError(
            "`segments` leaves must share a leading T axis. "
            f"Received: leading sizes {dict(sorted(sizes.items()))}"
        )
    T = next(iter(sizes.values()))
    if T < 1:
        raise MemcoreError(f"`segments` must hold T >= 1 segments. Received: T={T}")
    _check_int_option("truncate_every", truncate_every)
    _check_int_option("horizon", horizon)
    if offload not in OFFLOAD_CHOICES:
        raise MemcoreError(
            f"`offload` must be None or 'host'. Received: offload={offload!r}"
        )
    if isinstance(loss_scale, bool) or jnp.shape(loss_scale) != ():
        raise MemcoreError(
            "`loss_scale` must be a real scalar. "
            f"Received: loss_scale of shape {jnp.shape(loss_scale)} ({type(loss_scale).__name__})"
        )
    if not jnp.issubdtype(jnp.result_type(loss_scale), jnp.number) or jnp.issubdtype(
        jnp.result_type(loss_scale), jnp.complexfloating
    ):
        raise MemcoreError(f"`loss_scale` must be a real scalar. Received: {loss_scale!r}")
    return T


def check_step_output(out: Any, memory: Any) -> tuple[Any, Any]:
    """(loss, next_memory) of one step, checked against the memory it was given (trace time)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise MemcoreError(
            "`step` must return (loss, next_memory). "
            f"Received: {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
        )
    loss, nxt = out
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.inexact):
        raise MemcoreError(
            "`step`'s loss must be a floating scalar. "
            f"Received: shape {jnp.shape(loss)}, dtype {jnp.result_type(loss)}"
        )
    want = jax.tree_util.tree_structure(memory)
    got = jax.tree_util.tree_structure(nxt)
    if want != got:
        raise MemcoreError(
            f"`step`'s next_memory must have the memory's structure {want}. Received: {got}"
        )
    for (path, m), n in zip(
        jax.tree_util.tree_flatten_with_path(memory)[0], jax.tree_util.tree_leaves(nxt)
    ):
        if tuple(jnp.shape(n)) != tuple(m.shape) or jnp.result_type(n) != m.dtype:
            raise MemcoreError(
                f"`step`'s next_memory{_path(path)} must have shape {tuple(m.shape)} and dtype "
                f"{m.dtype} like the memory it was given. "
                f"Received: shape {tuple(jnp.shape(n))}, dtype {jnp.result_type(n)}"
            )
    return loss, nxt
