"""Framework-native building blocks: plain functions over parameter pytrees (dicts of arrays).

No Flax or Equinox: each block is an ``init_*(key, ...) -> params`` function and an apply
function that is pure in ``params``, so it composes with ``jax.jit``, ``jax.grad`` and
``jax.checkpoint`` like any other JAX function.

* reader: ``init_reader(key, D)`` -> {wq, wk, wv, wo}; ``reader(params, x, memory, num_heads=H)``.
* writer: ``init_writer(key, K, D)`` -> {wq, wk, wv, v_bias} (the writer owns v_bias);
  ``writer(params, memory, x, ...)``, ``writer_initial_memory``, ``writer_reset``.
* SAB cell: ``init_sab_cell(key, I, Hd, A, O)`` -> SAB_PARAMS;
  ``sab_cell(params, x, (h, c), memories, config=...)``.
* ``memformer_params(reader, writer)`` renames both into the routing drivers' MEMFORMER_PARAMS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from memcore.backends.jax.attention import memory_read
from memcore.backends.jax.memory import memory_init, memory_reset, memory_write
from memcore.backends.jax.steps import sab_step
from memcore.config import SABConfig
from memcore.errors import expect

__all__ = [
    "init_reader",
    "init_sab_cell",
    "init_writer",
    "memformer_params",
    "reader",
    "sab_cell",
    "writer",
    "writer_initial_memory",
    "writer_reset",
]

Params = Mapping[str, jax.Array]


def _uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    # Uniform with variance 1 / fan_in (LeCun), the scale the conformance samplers use.
    bound = math.sqrt(3.0 / max(fan_in, 1))
    return jax.random.uniform(key, shape, dtype=dtype, minval=-bound, maxval=bound)


def _positive(name: str, value: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    expect(ok, name, "be an integer >= 1", f"{name}={value!r}")


# ----------------------------------------------------------------------------- reader
def init_reader(key: jax.Array, dim: int, *, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Parameters of a memory reader: wq, wk, wv, wo, each (D, D)."""
    _positive("dim", dim)
    ks = jax.random.split(key, 4)
    return {n: _uniform(k, (dim, dim), dim, dtype) for n, k in zip(("wq", "wk", "wv", "wo"), ks)}


def reader(params: Params, x: jax.Array, memory: jax.Array, *, num_heads: int) -> jax.Array:
    """Tokens x (B, L, D) read memory (B, K, D): (B, L, D) (Memformer Eq. 1-3)."""
    p = params
    return memory_read(x, memory, p["wq"], p["wk"], p["wv"], p["wo"], num_heads=num_heads)


# ----------------------------------------------------------------------------- writer
def init_writer(key: jax.Array, slots: int, dim: int, *, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Parameters of a memory writer: wq, wk, wv (D, D) and the slot bias v_bias (K, D)."""
    _positive("slots", slots)
    _positive("dim", dim)
    ks = jax.random.split(key, 4)
    out = {n: _uniform(k, (dim, dim), dim, dtype) for n, k in zip(("wq", "wk", "wv"), ks[:3])}
    out["v_bias"] = jax.random.normal(ks[3], (slots, dim), dtype=dtype)
    return out


def writer(
    params: Params,
    memory: jax.Array,
    x: jax.Array,
    *,
    num_heads: int,
    tau: float = 0.25,
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """M' = bmn(slot_attention(memory, x), v_bias): memory (B, K, D), x (B, L, D) -> (B, K, D)."""
    p = params
    return memory_write(
        memory,
        x,
        p["wq"],
        p["wk"],
        p["wv"],
        p["v_bias"],
        num_heads=num_heads,
        tau=tau,
        token_mask=token_mask,
    )


def writer_initial_memory(params: Params, batch_size: int) -> jax.Array:
    """M_0 = normalize(v_bias) for each of ``batch_size`` rows: (B, K, D)."""
    return memory_init(params["v_bias"], batch_size=batch_size)


def writer_reset(params: Params, memory: jax.Array, reset: jax.Array) -> jax.Array:
    """Rows b with reset[b] (B,) bool go back to the initial memory: (B, K, D)."""
    return memory_reset(memory, params["v_bias"], reset=reset)


def memformer_params(reader_params: Params, writer_params: Params) -> dict[str, jax.Array]:
    """The routing drivers' MEMFORMER_PARAMS dict from a reader's and a writer's params."""
    out = {f"read_{n}": reader_params[n] for n in ("wq", "wk", "wv", "wo")}
    out.update({f"write_{n}": writer_params[n] for n in ("wq", "wk", "wv")})
    out["v_bias"] = writer_params["v_bias"]
    return out


# ----------------------------------------------------------------------------- SAB cell
def init_sab_cell(
    key: jax.Array, input_size: int, hidden: int, scorer: int, out: int, *, dtype=jnp.float32
) -> dict[str, jax.Array]:
    """SAB_PARAMS: lstm_w (I+Hd, 4Hd), lstm_b (4Hd,), w1, w2 (Hd, A), w3 (A,),
    v1, v2 (Hd, O), b_y (O,).

    The forget-gate bias starts at 1 (a common LSTM choice); the others at 0.
    """
    for name, value in (
        ("input_size", input_size),
        ("hidden", hidden),
        ("scorer", scorer),
        ("out", out),
    ):
        _positive(name, value)
    ks = jax.random.split(key, 6)
    b = jnp.zeros((4 * hidden,), dtype=dtype).at[hidden : 2 * hidden].set(1.0)
    return {
        "lstm_w": _uniform(ks[0], (input_size + hidden, 4 * hidden), input_size + hidden, dtype),
        "lstm_b": b,
        "w1": _uniform(ks[1], (hidden, scorer), hidden, dtype),
        "w2": _uniform(ks[2], (hidden, scorer), hidden, dtype),
        "w3": _uniform(ks[3], (scorer,), scorer, dtype),
        "v1": _uniform(ks[4], (hidden, out), hidden, dtype),
        "v2": _uniform(ks[5], (hidden, out), hidden, dtype),
        "b_y": jnp.zeros((out,), dtype=dtype),
    }


def sab_cell(
    params: Params,
    x: jax.Array,
    state: tuple[jax.Array, jax.Array],
    memories: jax.Array,
    *,
    config: SABConfig,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One SAB step: x (B, I), state (h, c) each (B, Hd), memories (B, N, Hd).

    Returns ((h, c), y (B, O)). Appending h to the memories every k_att steps, and any
    truncation, is the caller's loop (see :mod:`memcore.backends.jax.routing`).
    """
    h, c, y = sab_step(params, x, state[0], state[1], memories, config=config)
    return (h, c), y
