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

import functools

import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax._driver import (
    held_bytes,
    scalar,
    tree_add,
    vjp_driver,
    weights_array,
)
from memcore.backends.jax.sab_routing import sab_bptt, sab_full_bptt, sab_sparse_replay
from memcore.backends.jax.steps import memformer_step, step_loss
from memcore.errors import MemcoreError
from memcore.routing_types import Loss, RoutingResult

# The reference's entry checks, so every backend rejects bad input with the same message.
from memcore.routing_validation import check_memformer, reject_memformer_only

__all__ = ["bptt", "mrbp", "sab_bptt", "sab_sparse_replay"]


# ----------------------------------------------------------------------------- Memformer
def _mf_step_loss(
    params, memory, t, x, target, weight, reset, mask, *, config, kind, truncate_every
):
    """One Memformer step and its weighted loss; M entering step t > 0 with t % k == 0 is cut."""
    if truncate_every is not None:
        cut = (t > 0) & (t % truncate_every == 0)
        memory = jnp.where(cut, lax.stop_gradient(memory), memory)
    m_next, y = memformer_step(params, x, memory, config=config, token_mask=mask, reset=reset)
    return m_next, weight * step_loss(params, y, target, kind)


_mf_step_jit = jax.jit(_mf_step_loss, static_argnames=("config", "kind", "truncate_every"))


@functools.partial(jax.jit, static_argnames=("config", "kind", "truncate_every", "remat"))
def _mf_unroll(
    params,
    memory0,
    xs,
    targets,
    weights,
    resets,
    token_mask,
    *,
    config,
    kind,
    truncate_every,
    remat,
):
    """(L, M_T) of a Memformer rollout as one lax.scan; ``remat`` checkpoints every step."""
    step = functools.partial(_mf_step_loss, config=config, kind=kind, truncate_every=truncate_every)
    if remat:
        # Saves nothing inside the step: the scan keeps only the step's inputs (the carry M_t).
        step = jax.checkpoint(
            step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable
        )

    def body(memory, inp):
        t, x, target, weight, reset, mask = inp
        return step(params, memory, t, x, target, weight, reset, mask)

    ts = jnp.arange(xs.shape[0])
    m_last, losses = lax.scan(body, memory0, (ts, xs, targets, weights, resets, token_mask))
    return jnp.sum(losses), m_last


def _mf_rollout(
    params,
    xs,
    m0,
    targets,
    *,
    config,
    loss,
    resets,
    token_mask,
    truncate_every,
    remat,
    memory_arg="state0",
):
    check_memformer(
        params, xs, m0, targets, config, loss, resets, token_mask, truncate_every,
        memory_arg=memory_arg,
    )  # fmt: skip
    weights = weights_array(loss, xs.shape[0], xs.dtype)

    def fn(p, m):
        return _mf_unroll(
            p,
            m,
            xs,
            targets,
            weights,
            resets,
            token_mask,
            config=config,
            kind=loss.kind,
            truncate_every=truncate_every,
            remat=remat,
        )

    caller = (xs, targets, resets, token_mask)
    value, final, grads, d_m0, held = vjp_driver(fn, dict(params), m0, caller)
    if remat:
        held += _mf_step_residual_bytes(
            params,
            xs,
            m0,
            targets,
            weights,
            resets,
            token_mask,
            0,
            config,
            loss.kind,
            truncate_every,
        )[1]
    return RoutingResult(scalar(value), grads, d_m0, final, held)


def _mf_step_residual_bytes(
    params,
    xs,
    memory,
    targets,
    weights,
    resets,
    token_mask,
    t,
    config,
    kind,
    truncate_every,
    dm_next=None,
    exclude=(),
):
    """jax.vjp of step t from ``memory``: ((dparams, dM_t, loss_t) or None, residual bytes)."""

    def fn(p, m):
        return _mf_step_jit(
            p,
            m,
            jnp.asarray(t),
            xs[t],
            targets[t],
            weights[t],
            None if resets is None else resets[t],
            None if token_mask is None else token_mask[t],
            config=config,
            kind=kind,
            truncate_every=truncate_every,
        )

    (_m_next, value), pull = jax.vjp(fn, dict(params), memory)
    held = held_bytes(
        jax.tree_util.tree_leaves(pull), exclude=(params, memory, xs, targets, exclude)
    )
    if dm_next is None:
        return None, held
    dp, dm = pull((dm_next, jnp.ones_like(value)))
    return (dp, dm, value), held


def _mrbp_replay(params, xs, m0, targets, *, config, loss, resets, token_mask, truncate_every):
    check_memformer(
        params, xs, m0, targets, config, loss, resets, token_mask, truncate_every,
        memory_arg="M0",
    )  # fmt: skip
    n = xs.shape[0]
    weights = weights_array(loss, n, xs.dtype)
    memories = [m0]  # no-grad forward: only M_0..M_T are kept
    for t in range(n):
        m_next, _ = _mf_step_jit(
            params,
            memories[-1],
            jnp.asarray(t),
            xs[t],
            targets[t],
            weights[t],
            None if resets is None else resets[t],
            None if token_mask is None else token_mask[t],
            config=config,
            kind=loss.kind,
            truncate_every=truncate_every,
        )
        memories.append(m_next)
    stored = held_bytes(memories, exclude=(m0,)) + int(m0.nbytes)
    grads = jax.tree_util.tree_map(jnp.zeros_like, dict(params))
    dm = jnp.zeros_like(m0)  # the last step has no incoming memory gradient
    total, peak = 0.0, stored
    for t in range(n - 1, -1, -1):
        (dp, dm, value), held = _mf_step_residual_bytes(
            params,
            xs,
            memories[t],
            targets,
            weights,
            resets,
            token_mask,
            t,
            config,
            loss.kind,
            truncate_every,
            dm_next=dm,
            exclude=memories,
        )
        peak = max(peak, stored + held)
        grads = tree_add(grads, dp)
        total += float(value)
    return RoutingResult(total, grads, dm, memories[-1], peak)


# ----------------------------------------------------------------------------- public
def bptt(
    step,
    params,
    xs,
    state0,
    targets,
    *,
    config,
    loss=Loss(),
    resets=None,
    token_mask=None,
    truncate_every=None,
) -> RoutingResult:
    """Full BPTT of ``step`` ("memformer": one lax.scan; "sab": no chunk truncation).

    Args:
        step: "memformer" or "sab". params: dict name -> array (MEMFORMER_PARAMS or
            SAB_PARAMS, plus head_w for xent). xs: (T, B, L, D) or (T, B, I).
        state0: M_0 (B, K, D), or (h0, c0) each (B, Hd). targets: see the routing contract.
        resets: (T, B) bool; token_mask: (T, B, L) bool; truncate_every: k (memformer only).
    """
    if step == "memformer":
        return _mf_rollout(
            params,
            xs,
            state0,
            targets,
            config=config,
            loss=loss,
            resets=resets,
            token_mask=token_mask,
            truncate_every=truncate_every,
            remat=False,
        )
    if step == "sab":
        reject_memformer_only(
            "sab", resets=resets, token_mask=token_mask, truncate_every=truncate_every
        )
        return sab_full_bptt(params, xs, state0, targets, config=config, loss=loss)
    raise MemcoreError(f"`step` must be 'memformer' or 'sab'. Received: step={step!r}")


def mrbp(
    params,
    xs,
    M0,
    targets,
    *,
    config,
    loss=Loss(),
    resets=None,
    token_mask=None,
    truncate_every=None,
    method: str = "checkpoint",
) -> RoutingResult:
    """Memformer MRBP (Alg. 1): the gradients of BPTT keeping only M_0..M_T.

    Args:
        params, xs (T, B, L, D), M0 (B, K, D), targets, resets, token_mask, truncate_every:
            as :func:`bptt` with step "memformer".
        method: "checkpoint" (lax.scan over jax.checkpoint-ed steps) or "replay"
            (python loop of per-step jax.vjp from the stored memories).
    """
    kw = dict(
        config=config,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
    )
    if method == "checkpoint":
        return _mf_rollout(params, xs, M0, targets, remat=True, memory_arg="M0", **kw)
    if method == "replay":
        return _mrbp_replay(params, xs, M0, targets, **kw)
    raise MemcoreError(f"`method` must be 'checkpoint' or 'replay'. Received: method={method!r}")
