"""The recurrent steps gradient routing works on, declared as data, hand-written both ways.

A step is ``forward(params, x_t, state, **per_step) -> (state', y_t, cache)`` and
``backward(cache, d_state', d_y) -> (d_params, d_x, d_state)``, both built from the
reference op pairs (no autodiff). Cotangents that are zero may be passed as ``None``;
``backward`` then skips the VJP work they would feed (MRBP's last step, zero loss weights).
Inputs are validated by the routing drivers (:mod:`memcore.reference.routing`), not here.

Two steps ship, in :data:`STEPS`:

* ``memformer_step``: state M (B, K, D), x_t (B, L, D), y_t (B, L, D).
  ``M <- memory_reset(M, v_bias, reset)`` when ``reset`` is given; ``r = memory_read(x_t, M)``,
  ``h = x_t + r``, ``y_t = h``, ``M' = memory_write(M, h; token_mask)``.
* ``sab_step`` (SAB Alg. 1): state ``SabState(h, c, memories)`` with h, c (B, Hd) and
  memories a tuple of N arrays (B, Hd); x_t (B, I); y_t (B, O).
  ``(h_hat, c') = lstm_cell(x_t, h, c)``, ``(s, w) = sparse_retrieve(h_hat, stack(memories))``,
  ``h' = h_hat + s``, ``y_t = h' v1 + s v2 + b_y``; when ``t % k_att == 0`` (t 1-based)
  ``h'`` itself (not detached) is appended to the memories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs

from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError
from memcore.reference._xp import array_namespace, mT, zeros
from memcore.reference.attention import ReadCache, memory_read_backward, memory_read_forward
from memcore.reference.lstm import LstmCache, lstm_cell_backward, lstm_cell_forward
from memcore.reference.memory import (
    ResetCache,
    WriteCache,
    memory_reset_backward,
    memory_reset_forward,
    memory_write_backward,
    memory_write_forward,
)
from memcore.reference.sab import RetrieveCache, sparse_retrieve_backward, sparse_retrieve_forward
from memcore.routing_types import MEMFORMER_PARAMS, SAB_PARAMS

__all__ = [
    "STEPS",
    "MemformerCache",
    "SabCache",
    "SabState",
    "Step",
    "get_step",
    "memformer_step",
    "sab_step",
    "stack_memories",
]


@attrs.frozen
class Step:
    """A recurrent unit routing drivers unroll.

    Attributes:
        name: "memformer" or "sab".
        params: the parameter names ``forward`` reads, in declared order.
        config_type: the config class ``forward`` takes as ``config=``.
        state: the state's structure, in words (for docs and error messages).
        forward: ``forward(params, x_t, state, *, config, **per_step) -> (state', y_t, cache)``.
        backward: ``backward(cache, d_state', d_y) -> (d_params, d_x, d_state)``.
    """

    name: str
    params: tuple[str, ...]
    config_type: type
    state: str
    forward: Callable[..., tuple[Any, Any, Any]]
    backward: Callable[..., tuple[dict[str, Any], Any, Any]]


# ------------------------------------------------------------------ memformer_step
class MemformerCache(NamedTuple):
    params: Mapping[str, Any]
    reset: ResetCache | None  # None when no reset flags were given
    read: ReadCache
    write: WriteCache


def memformer_forward(
    params: Mapping[str, Any],
    x_t: Any,
    state: Any,
    *,
    config: MemoryConfig,
    reset: Any = None,
    token_mask: Any = None,
) -> tuple[Any, Any, MemformerCache]:
    """One Memformer memory step.

    Args:
        params: MEMFORMER_PARAMS: read_wq, read_wk, read_wv, read_wo, write_wq, write_wk,
            write_wv (D, D); v_bias (K, D). Extra keys (a loss head) are ignored.
        x_t: (B, L, D) tokens of segment t.
        state: M_t (B, K, D).
        config: K, D, H and the write temperature tau.
        reset: (B,) bool or None: rows to replace by normalize(v_bias) before the step.
        token_mask: (B, L) bool or None: tokens the write may attend to (the read uses all).

    Returns:
        (M_{t+1} (B, K, D), y_t = h (B, L, D), cache).
    """
    p = params
    memory, reset_cache = state, None
    if reset is not None:
        memory, reset_cache = memory_reset_forward(memory, p["v_bias"], reset=reset)
    r, read = memory_read_forward(
        x_t, memory, p["read_wq"], p["read_wk"], p["read_wv"], p["read_wo"], num_heads=config.heads
    )
    h = x_t + r
    new_memory, write = memory_write_forward(
        memory,
        h,
        p["write_wq"],
        p["write_wk"],
        p["write_wv"],
        p["v_bias"],
        num_heads=config.heads,
        tau=config.tau,
        token_mask=token_mask,
    )
    return new_memory, h, MemformerCache(p, reset_cache, read, write)


def memformer_backward(
    cache: MemformerCache, d_state: Any, d_y: Any
) -> tuple[dict[str, Any], Any, Any]:
    """Gradients of one Memformer step from (dM_{t+1}, dy_t).

    dh = dy + (memory_write's dx), dx = dh + (memory_read's dx), dM = (write's dmemory) +
    (read's dmemory), then through memory_reset (reset rows send their gradient to v_bias).
    ``d_state=None`` (no gradient reaches M_{t+1}) skips the write's VJP; ``d_y=None`` is 0.

    Returns:
        (d_params over MEMFORMER_PARAMS, dx_t (B, L, D), dM_t (B, K, D)).
    """
    p = cache.params
    xp = array_namespace(p["v_bias"])
    if d_y is None:
        d_y = xp.zeros_like(cache.read.x)
    if d_state is None:
        d_mem = None
        dh = d_y
        dwq, dwk, dwv, dvb = (
            xp.zeros_like(p[n]) for n in ("write_wq", "write_wk", "write_wv", "v_bias")
        )
    else:
        d_mem, dh_write, dwq, dwk, dwv, dvb = memory_write_backward(cache.write, d_state)
        dh = d_y + dh_write
    dx_read, dm_read, rq, rk, rv, ro = memory_read_backward(cache.read, dh)
    dx = dh + dx_read
    d_mem = dm_read if d_mem is None else d_mem + dm_read
    if cache.reset is not None:
        d_mem, dvb_reset = memory_reset_backward(cache.reset, d_mem)
        dvb = dvb + dvb_reset
    grads = dict(zip(MEMFORMER_PARAMS, (rq, rk, rv, ro, dwq, dwk, dwv, dvb)))
    return grads, dx, d_mem


memformer_step = Step(
    name="memformer",
    params=MEMFORMER_PARAMS,
    config_type=MemoryConfig,
    state="M (B, K, D)",
    forward=memformer_forward,
    backward=memformer_backward,
)


# ------------------------------------------------------------------ sab_step
class SabState(NamedTuple):
    """SAB's recurrent state: h, c (B, Hd) and the memories, a tuple of N arrays (B, Hd)."""

    h: Any
    c: Any
    memories: tuple[Any, ...]


class SabCache(NamedTuple):
    params: Mapping[str, Any]
    lstm: LstmCache
    retrieve: RetrieveCache
    h: Any  # (B, Hd) h' = h_hat + s
    s: Any  # (B, Hd) the retrieved summary
    n_read: int  # N, the memories read (and returned gradients for)
    wrote: bool  # h' was appended as memory N


def stack_memories(memories: tuple[Any, ...], like: Any) -> Any:
    """(B, N, Hd) from N arrays (B, Hd); (B, 0, Hd) shaped like ``like`` when N = 0."""
    xp = array_namespace(like)
    if not memories:
        return zeros(xp, (like.shape[0], 0, like.shape[-1]), like)
    return xp.stack(list(memories), axis=1)


def sab_forward(
    params: Mapping[str, Any], x_t: Any, state: SabState, *, config: SABConfig, t: int
) -> tuple[SabState, Any, SabCache]:
    """SAB step t (1-based; SAB Alg. 1).

    Args:
        params: SAB_PARAMS: lstm_w (I + Hd, 4 Hd), lstm_b (4 Hd,), w1, w2 (Hd, A), w3 (A,),
            v1, v2 (Hd, O), b_y (O,). Extra keys (a loss head) are ignored.
        x_t: (B, I).
        state: SabState(h, c, memories) entering step t.
        config: k_top, k_att, eps, threshold_grad, block_score_grad.
        t: the 1-based step index; h' is written to the memories when t % k_att == 0.

    Returns:
        (SabState(h', c', memories'), y_t (B, O), cache).
    """
    p = params
    h, c, memories = state
    (h_hat, c_new), lstm = lstm_cell_forward(x_t, h, c, p["lstm_w"], p["lstm_b"])
    (s, _), retrieve = sparse_retrieve_forward(
        h_hat,
        stack_memories(memories, h_hat),
        p["w1"],
        p["w2"],
        p["w3"],
        k_top=config.k_top,
        eps=config.eps,
        threshold_grad=config.threshold_grad,
        block_score_grad=config.block_score_grad,
    )
    xp = array_namespace(h_hat)
    h_new = h_hat + s
    y = xp.matmul(h_new, p["v1"]) + xp.matmul(s, p["v2"]) + p["b_y"]
    wrote = t % config.k_att == 0
    new_memories = tuple(memories) + ((h_new,) if wrote else ())
    cache = SabCache(p, lstm, retrieve, h_new, s, len(memories), wrote)
    return SabState(h_new, c_new, new_memories), y, cache


def sab_backward(cache: SabCache, d_state: Any, d_y: Any) -> tuple[dict[str, Any], Any, SabState]:
    """Gradients of SAB step t from (dh', dc', dmemories') and dy_t.

    dh' collects dh' from the next step, dmemories'[N] when h' was written, and dy v1^T;
    ds = dh' + dy v2^T; (dh_hat, dM) from sparse_retrieve's backward (dweights = 0) plus
    dh' on dh_hat; then lstm_cell's backward. dmemories_i = dmemories'_i + dM[:, i].
    Any cotangent may be ``None`` (zero); ``d_state`` may be ``None`` altogether.

    Returns:
        (d_params over SAB_PARAMS, dx_t (B, I), SabState(dh, dc, dmemories (N arrays))).
    """
    k = cache
    p = k.params
    xp = array_namespace(k.h)
    dh_out, dc_out, dmem_out = d_state if d_state is not None else (None, None, None)
    dmem_out = tuple(dmem_out) if dmem_out is not None else ()
    dh = xp.zeros_like(k.h) if dh_out is None else dh_out
    if k.wrote and len(dmem_out) > k.n_read and dmem_out[k.n_read] is not None:
        dh = dh + dmem_out[k.n_read]
    ds = dh
    if d_y is None:
        dv1, dv2, db_y = (xp.zeros_like(p[n]) for n in ("v1", "v2", "b_y"))
    else:
        dh = dh + xp.matmul(d_y, mT(xp, p["v1"]))
        ds = dh + xp.matmul(d_y, mT(xp, p["v2"]))
        dv1 = xp.matmul(mT(xp, k.h), d_y)
        dv2 = xp.matmul(mT(xp, k.s), d_y)
        db_y = xp.sum(d_y, axis=0)
    no_weight_grad = xp.zeros_like(k.retrieve.w)
    dh_score, d_stack, dw1, dw2, dw3 = sparse_retrieve_backward(k.retrieve, (ds, no_weight_grad))
    dc_new = xp.zeros_like(k.h) if dc_out is None else dc_out
    dx, dh_in, dc_in, dlw, dlb = lstm_cell_backward(k.lstm, (dh + dh_score, dc_new))
    dmem_in = tuple(
        d_stack[:, i, :]
        if i >= len(dmem_out) or dmem_out[i] is None
        else dmem_out[i] + d_stack[:, i, :]
        for i in range(k.n_read)
    )
    grads = dict(zip(SAB_PARAMS, (dlw, dlb, dw1, dw2, dw3, dv1, dv2, db_y)))
    return grads, dx, SabState(dh_in, dc_in, dmem_in)


sab_step = Step(
    name="sab",
    params=SAB_PARAMS,
    config_type=SABConfig,
    state="SabState(h (B, Hd), c (B, Hd), memories: N arrays (B, Hd))",
    forward=sab_forward,
    backward=sab_backward,
)

STEPS: Mapping[str, Step] = {s.name: s for s in (memformer_step, sab_step)}


def get_step(step: str | Step) -> Step:
    """The step named ``step`` (or ``step`` itself); an unknown name lists the choices."""
    if isinstance(step, Step):
        return step
    if isinstance(step, str) and step in STEPS:
        return STEPS[step]
    raise MemcoreError(f"Unknown step {step!r}. Available: {', '.join(STEPS)}")
