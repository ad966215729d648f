"""The SAB gradient in every mode of SABConfig (memcore's and the release's), hand-written.

:func:`sab_modes_bptt` is :func:`memcore.reference.routing.sab_bptt` (and, with
``truncate=False``, ``sab_full_bptt``) generalised to the config's ``scorer``,
``sparsify`` and ``truncation`` (docs/semantics.md, "Release-compatible mode") and to an
LSTM with the release's two biases (``lstm_b`` + ``lstm_b_hh`` when ``params`` has the
second). With every mode "memcore" and one bias it computes exactly what ``sab_bptt``
computes (the same operations in the same order).

Cuts: (h, c) entering every 1-based step t > 1 with (t - 1) % k_trunc == config.trunc_phase.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from memcore.config import SABConfig
from memcore.errors import MemcoreError
from memcore.reference._xp import array_namespace, mT
from memcore.reference.lstm import lstm_cell_backward, lstm_cell_forward
from memcore.reference.routing._common import GradSums, loss_cotangent
from memcore.reference.routing.losses import DEFAULT_LOSS, loss_forward, step_weights
from memcore.reference.sab_release import retrieve_backward, retrieve_forward, scorer_params
from memcore.reference.steps import SabState, stack_memories
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult

__all__ = ["is_cut", "mode_params", "sab_modes_bptt", "sab_modes_step"]

B_HH = "lstm_b_hh"


def mode_params(config: SABConfig, two_biases: bool = False) -> tuple[str, ...]:
    """The parameter names of a SAB model in ``config``'s mode (head_w not included)."""
    bias = ("lstm_b", B_HH) if two_biases else ("lstm_b",)
    return ("lstm_w", *bias, *scorer_params(config), "v1", "v2", "b_y")


def is_cut(t: int, config: SABConfig) -> bool:
    """(h, c) entering 1-based step t is stop-gradiented (t > 1, phase config.trunc_phase)."""
    return t > 1 and (t - 1 - config.trunc_phase) % config.k_trunc == 0


class StepCache(NamedTuple):
    params: Mapping[str, Any]
    lstm: Any
    retrieve: Any
    h: Any
    s: Any
    n_read: int
    wrote: bool


def sab_modes_step(params, x_t, state: SabState, *, config: SABConfig, t: int):
    """SAB step t (1-based) in ``config``'s mode: (SabState', y_t (B, O), cache)."""
    p = params
    xp = array_namespace(x_t)
    h, c, memories = state
    b = p["lstm_b"] + p[B_HH] if B_HH in p else p["lstm_b"]
    (h_hat, c_new), lstm = lstm_cell_forward(x_t, h, c, p["lstm_w"], b)
    (s, _), retrieve = retrieve_forward(h_hat, stack_memories(memories, h_hat), p, config)
    h_new = h_hat + s
    y = xp.matmul(h_new, p["v1"]) + xp.matmul(s, p["v2"]) + p["b_y"]
    wrote = t % config.k_att == 0
    new_memories = tuple(memories) + ((h_new,) if wrote else ())
    cache = StepCache(p, lstm, retrieve, h_new, s, len(memories), wrote)
    return SabState(h_new, c_new, new_memories), y, cache


def _step_backward(cache: StepCache, dh_out, dc_out, dmem_out, d_y):
    """(grads, SabState(dh, dc, dmemories)); see reference.steps.sab_backward."""
    k, p = cache, cache.params
    xp = array_namespace(k.h)
    dh = xp.zeros_like(k.h) if dh_out is None else dh_out
    if k.wrote and len(dmem_out) > k.n_read and dmem_out[k.n_read] is not None:
        dh = dh + dmem_out[k.n_read]
    ds = dh
    grads: dict[str, Any] = {}
    if d_y is not None:
        dh = dh + xp.matmul(d_y, mT(xp, p["v1"]))
        ds = dh + xp.matmul(d_y, mT(xp, p["v2"]))
        grads.update(v1=xp.matmul(mT(xp, k.h), d_y), v2=xp.matmul(mT(xp, k.s), d_y),
                     b_y=xp.sum(d_y, axis=0))  # fmt: skip
    no_weight_grad = xp.zeros_like(k.retrieve.w)
    dh_score, d_stack, d_scorer = retrieve_backward(k.retrieve, (ds, no_weight_grad))
    grads.update(d_scorer)
    dc_new = xp.zeros_like(k.h) if dc_out is None else dc_out
    _, dh_in, dc_in, dlw, dlb = lstm_cell_backward(k.lstm, (dh + dh_score, dc_new))
    grads.update(lstm_w=dlw, lstm_b=dlb)
    if B_HH in p:
        grads[B_HH] = dlb
    dmem_in = tuple(
        d_stack[:, i, :] if i >= len(dmem_out) or dmem_out[i] is None
        else dmem_out[i] + d_stack[:, i, :]
        for i in range(k.n_read)
    )  # fmt: skip
    return grads, SabState(dh_in, dc_in, dmem_in)


def _check(params: Any, config: Any, loss: Any) -> None:
    if not isinstance(config, SABConfig):
        raise MemcoreError(
            f"`config` must be a memcore.SABConfig. Received: {type(config).__name__}"
        )
    if not isinstance(params, Mapping):
        raise MemcoreError(f"`params` must be a dict of arrays. Received: {type(params).__name__}")
    want = set(mode_params(config, B_HH in params)) | (
        {HEAD_PARAM} if loss.kind == "xent" else set()
    )
    if set(params) != want:
        raise MemcoreError(
            f"`params` must contain exactly {', '.join(sorted(want))} for scorer "
            f"{config.scorer!r}. Received: {', '.join(sorted(params))}"
        )


def sab_modes_bptt(
    params: Mapping[str, Any],
    xs: Any,
    state0: Any,
    targets: Any,
    *,
    config: SABConfig,
    loss: Loss = DEFAULT_LOSS,
    truncate: bool = True,
) -> RoutingResult:
    """The SAB gradient of ``config``'s mode, whole graph kept (reference, hand-written).

    Args:
        params: :func:`mode_params` (+ head_w (O, C) for loss "xent").
        xs: (T, B, I); state0: (h0, c0) each (B, Hd); memories start as (h0,) with
            include_h0_memory; targets: (T, B, O) float (mse) or (T, B) ints (xent).
        truncate: cut (h, c) at :func:`is_cut` steps (False: full BPTT of the forward).

    Returns:
        RoutingResult(loss, grads, (dh0, dc0), (h_T, c_T), peak_cache_bytes=0).
    """
    _check(params, config, loss)
    steps = xs.shape[0]
    weights = step_weights(loss.weights, steps)
    head = params.get(HEAD_PARAM)
    h0, c0 = state0
    state = SabState(h0, c0, (h0,) if config.include_h0_memory else ())
    total, records = 0.0, []
    for t in range(1, steps + 1):
        state, y, cache = sab_modes_step(params, xs[t - 1, ...], state, config=config, t=t)
        value, loss_cache = loss_forward(loss.kind, y, targets[t - 1, ...], head)
        total += weights[t - 1] * value
        records.append((t, cache, loss_cache))
    grads = GradSums(params)
    d_mem: list[Any] = [None] * (int(config.include_h0_memory) + steps // config.k_att)
    dh = dc = None
    for t, cache, loss_cache in reversed(records):
        d_y = loss_cotangent(grads, loss_cache, weights[t - 1])
        n_out = cache.n_read + int(cache.wrote)
        step_grads, d_state = _step_backward(cache, dh, dc, tuple(d_mem[:n_out]), d_y)
        grads.add(step_grads)
        d_mem[: cache.n_read] = d_state.memories
        dh, dc = d_state.h, d_state.c
        if truncate and is_cut(t, config):
            dh = dc = None
    xp = array_namespace(xs)
    dh = xp.zeros_like(h0) if dh is None else dh
    dc = xp.zeros_like(c0) if dc is None else dc
    if config.include_h0_memory and d_mem and d_mem[0] is not None:
        dh = dh + d_mem[0]
    return RoutingResult(total, grads.sums, (dh, dc), (state.h, state.c), 0)
