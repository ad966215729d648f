"""SAB sparse retrieval over a preallocated memory bank, in ``jax.numpy``.

The bank has a fixed number of slots, ``N_max = [include_h0_memory] + T // k_att``
(:func:`bank_slots`), so every step of a rollout has the same shapes and one compiled
program serves any ``T`` of one shape. Slot ``i`` holds memory ``i`` once it is written;
which slots are live is a count ``n`` (the same for every row), not a growing list. A
step t (1-based) reads ``n_t = [include_h0_memory] + (t - 1) // k_att`` memories and a
write step (``t % k_att == 0``) stores its ``h`` in slot ``n_t``.

Next to each memory the bank keeps the scorer's key of it (``m_i w1`` for the paper's
scorer), computed once at the write: scoring step t then costs a ``tanh`` over the keys
instead of a matmul over every memory. Reads gather only the ``min(k_top + 1, N_max)``
best-scored slots, so the value read never touches the whole bank.

The scorer and the sparsifier are chosen from the config by :func:`retrieval`
(``config.scorer`` / ``config.sparsify`` when the config has them, else ``"paper"``),
from the tables :data:`SCORERS` and :data:`SPARSIFIERS`, so another rule (e.g. the
authors' release) is one more entry.

Shapes: h, h_hat (B, Hd); bank (B, N_max, Hd); keys (B, N_max, Ak); scores (B, N_max);
selected weights and slot ids (B, K) with K = min(k_top + 1, N_max).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import jax
import jax.numpy as jnp
from jax import lax

from memcore.backends.jax.sab_release import release_key, release_score, release_sparsify
from memcore.errors import MemcoreError

__all__ = [
    "SCORERS",
    "SPARSIFIERS",
    "Retrieval",
    "bank_init",
    "bank_read",
    "bank_slots",
    "bank_write",
    "memories_before",
    "paper_key",
    "paper_score",
    "paper_sparsify",
    "retrieval",
]

Params = Mapping[str, Any]


def bank_slots(steps: int, config: Any) -> int:
    """N_max = [include_h0_memory] + steps // k_att: every memory a rollout can write."""
    return int(config.include_h0_memory) + steps // config.k_att


def memories_before(t: jax.Array, config: Any) -> jax.Array:
    """n_t, the memories step t (1-based, traced) reads; also the slot its write fills."""
    return int(config.include_h0_memory) + (t - 1) // config.k_att


# ----------------------------------------------------------------------------- scorers
def paper_key(params: Params, m: jax.Array) -> jax.Array:
    """The paper scorer's key of memory m (B, Hd): m w1 (B, A) (SAB Alg. 1 line 4)."""
    return m @ params["w1"]


def paper_score(params: Params, h_hat: jax.Array, keys: jax.Array) -> jax.Array:
    """a_i = w3 . tanh(m_i w1 + h_hat w2) from keys (B, N, A): (B, N) (SAB Alg. 1 lines 4-5).

    Written as a multiply and a sum, not a matvec, so that XLA fuses the tanh into one pass
    over the keys (the bank is the largest array a long rollout touches every step).
    """
    return jnp.sum(jnp.tanh(keys + (h_hat @ params["w2"])[:, None, :]) * params["w3"], axis=-1)


# ----------------------------------------------------------------------------- sparsifiers
def paper_sparsify(
    scores: jax.Array, n: jax.Array, *, k_top: int, eps: float, threshold_grad: bool
) -> tuple[jax.Array, jax.Array]:
    """memcore's top-k sparsifier (docs/semantics.md 3.9) over the first ``n`` slots.

    tau = the min(k_top + 1, n)-th largest live score, by value; z_i = a_i - tau for live
    a_i > tau, else 0 (derivative 0); w = z / (sum z + eps), 0 where the denominator is 0.
    Without ``threshold_grad`` tau is a constant; with it, its gradient is split equally
    among the live entries equal to it.

    Args:
        scores: (B, N_max); n: traced count of live slots (0 <= n <= N_max).

    Returns:
        (weights (B, K), slot ids (B, K)): the K = min(k_top + 1, N_max) best live slots
        (ids of dead slots may appear with weight 0 when n < K); every other slot has
        weight 0.
    """
    big = scores.shape[1]
    k_sel = min(k_top + 1, big)
    live = jnp.arange(big) < n
    masked = jnp.where(live, lax.stop_gradient(scores), -jnp.inf)
    top, idx = lax.top_k(masked, k_sel)
    k = jnp.clip(jnp.minimum(k_top + 1, n), 1, k_sel)
    kth = lax.dynamic_slice_in_dim(top, k - 1, 1, axis=1)  # (B, 1), exact by value
    kth = jnp.where(n > 0, kth, jnp.zeros_like(kth))  # finite when nothing is live
    thr = kth
    if threshold_grad:
        eq = live & (scores == kth)
        count = jnp.sum(eq, axis=-1, keepdims=True).astype(scores.dtype)
        mean = jnp.sum(jnp.where(eq, scores, 0.0), axis=-1, keepdims=True) / jnp.where(
            count > 0, count, 1.0
        )
        # The forward value stays the exact kth; only the gradient goes to the tied entries.
        thr = kth + (mean - lax.stop_gradient(mean))
    picked = jnp.take_along_axis(scores, idx, axis=1)
    # Active entries are decided by comparing values (not the sign of a - tau, which an
    # FMA may leave a sub-ulp off zero at the threshold entry itself).
    active = jnp.take_along_axis(jnp.broadcast_to(live, scores.shape), idx, axis=1)
    active = active & (lax.stop_gradient(picked) > kth)
    z = jnp.where(active, picked - thr, jnp.zeros_like(picked))
    denom = jnp.sum(z, axis=-1, keepdims=True) + eps
    denom = jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return z / denom, idx


# key(params, m) -> keys (B, Ak); score(params, h_hat, keys (B, N, Ak)) -> (B, N)
# "memcore" is SABConfig's name for the paper rule; "release" is the authors' code (issue 14.4).
SCORERS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "paper": (paper_key, paper_score),
    "memcore": (paper_key, paper_score),
    "release": (release_key, release_score),
}
# sparsify(scores (B, N), n, *, k_top, eps, threshold_grad) -> (weights (B, K), ids (B, K))
SPARSIFIERS: dict[str, Callable[..., Any]] = {
    "paper": paper_sparsify,
    "memcore": paper_sparsify,
    "release": release_sparsify,
}


@attrs.frozen
class Retrieval:
    """The scorer (key, score) and the sparsifier one config selects (hashable: jit-static)."""

    key: Callable[..., Any]
    score: Callable[..., Any]
    sparsify: Callable[..., Any]


def _pick(table: Mapping[str, Any], value: str, name: str) -> Any:
    if value not in table:
        raise MemcoreError(
            f"`config.{name}` must be one of {', '.join(sorted(table))}. Received: {name}={value!r}"
        )
    return table[value]


def retrieval(config: Any) -> Retrieval:
    """The retrieval rule of ``config``: ``config.scorer`` and ``config.sparsify`` when the
    config has them, else memcore's ("paper")."""
    key, score = _pick(SCORERS, getattr(config, "scorer", "paper"), "scorer")
    sparsify = _pick(SPARSIFIERS, getattr(config, "sparsify", "paper"), "sparsify")
    return Retrieval(key, score, sparsify)


# ----------------------------------------------------------------------------- the bank
def _key_input(m: jax.Array, config: Any) -> jax.Array:
    # block_score_grad: the scorer sees its inputs without gradient (the value path keeps it).
    return lax.stop_gradient(m) if config.block_score_grad else m


def bank_init(
    rt: Retrieval, params: Params, h0: jax.Array, slots: int, config: Any
) -> tuple[jax.Array, jax.Array]:
    """The empty bank and its keys, with h0 in slot 0 when ``include_h0_memory``.

    Returns:
        (bank (B, slots, Hd), keys (B, slots, Ak)); Ak comes from the scorer's key of h0.
    """
    k0 = rt.key(params, _key_input(h0, config))
    bank = jnp.zeros((h0.shape[0], slots, h0.shape[1]), h0.dtype)
    keys = jnp.zeros((k0.shape[0], slots, k0.shape[1]), k0.dtype)
    if config.include_h0_memory and slots:
        bank = bank.at[:, 0].set(h0)
        keys = keys.at[:, 0].set(k0)
    return bank, keys


def bank_read(
    rt: Retrieval,
    params: Params,
    h_hat: jax.Array,
    bank: jax.Array,
    keys: jax.Array,
    n: jax.Array,
    config: Any,
) -> jax.Array:
    """s = sum_i w_i m_i over the first ``n`` slots (SAB Alg. 1 lines 3-8): (B, Hd).

    ``block_score_grad`` stops the score path into h_hat (the keys were stored without it).
    """
    if bank.shape[1] == 0:
        return jnp.zeros_like(h_hat)
    a = rt.score(params, _key_input(h_hat, config), keys)
    w, idx = rt.sparsify(
        a, n, k_top=config.k_top, eps=config.eps, threshold_grad=config.threshold_grad
    )
    picked = jnp.take_along_axis(bank, idx[:, :, None], axis=1)  # (B, K, Hd)
    return jnp.einsum("bk,bkh->bh", w, picked)


def bank_write(
    rt: Retrieval,
    params: Params,
    bank: jax.Array,
    keys: jax.Array,
    h: jax.Array,
    slot: jax.Array,
    write: jax.Array,
    config: Any,
) -> tuple[jax.Array, jax.Array]:
    """Store h (B, Hd) and its key in ``slot`` when ``write`` (a traced bool), else leave the
    bank as it was (the slot's old value is written back: O(B Hd), not a bank-wide select)."""
    if bank.shape[1] == 0:
        return bank, keys
    slot = jnp.minimum(slot, bank.shape[1] - 1)  # a non-write step may point past the end
    old_m = lax.dynamic_index_in_dim(bank, slot, axis=1, keepdims=False)
    old_k = lax.dynamic_index_in_dim(keys, slot, axis=1, keepdims=False)
    new_k = rt.key(params, _key_input(h, config))
    m = jnp.where(write, h, old_m)
    k = jnp.where(write, new_k, old_k)
    bank = lax.dynamic_update_index_in_dim(bank, m, slot, axis=1)
    keys = lax.dynamic_update_index_in_dim(keys, k, slot, axis=1)
    return bank, keys
