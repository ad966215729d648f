"""Frozen, validated configs. Frozen configs hash, so they can be static arguments to ``jax.jit``.

Derive variants with ``attrs.evolve(cfg, tau=0.5)``; every validator's message shows the
expected and the received value.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from memcore.errors import MemcoreError

__all__ = ["TAU_MIN", "MemoryConfig", "SABConfig", "check_eps", "check_tau"]


def _int_at_least(low: int):
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MemcoreError(
                f"`{attribute.name}` must be an integer >= {low}. "
                f"Received: {attribute.name}={value!r}"
            )

    return check


def _bool(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise MemcoreError(
            f"`{attribute.name}` must be a bool. Received: {attribute.name}={value!r}"
        )


def _choice(*choices: str):
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise MemcoreError(
                f"`{attribute.name}` must be one of {', '.join(repr(c) for c in choices)}. "
                f"Received: {attribute.name}={value!r}"
            )

    return check


# The smallest tau: 2**-126, the smallest normal float32. Logits are divided by
# sqrt(dh) * tau, so 1/tau must be finite in float32, the compute type of every dtype
# (docs/semantics.md, "Temperature range"); a subnormal tau such as 5e-324 is refused.
TAU_MIN = 2.0**-126


def check_tau(value: Any, name: str = "tau") -> None:
    """Validate the write temperature: a finite real in (0, 1], at least :data:`TAU_MIN`."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and TAU_MIN <= value <= 1.0
    )
    if not ok:
        raise MemcoreError(
            f"`{name}` must be a real number in (0, 1], at least 2**-126 = {TAU_MIN:.6g} "
            f"(the smallest normal float32, so that 1/{name} is finite). "
            f"Received: {name}={value!r}"
        )


def check_eps(value: Any, name: str = "eps") -> None:
    """Validate a non-negative finite epsilon."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0.0
    )
    if not ok:
        raise MemcoreError(f"`{name}` must be a finite real number >= 0. Received: {name}={value!r}")


@attrs.frozen(init=False)
class MemoryConfig:
    """Memformer memory: K slots of width D, H heads, write temperature tau.

    ``MemoryConfig(slots, dim, num_heads=H, tau=...)``: ``num_heads`` is the keyword used
    everywhere (ops, reference functions, torch modules); ``heads=`` is accepted too (it is
    the stored field's name, which ``attrs.evolve`` and the training TOML use).

    Attributes:
        slots: K, the number of memory slots.
        dim: D, the model width; must be divisible by ``heads``.
        heads: H, attention heads for reading and writing; dh = D / H (also ``num_heads``).
        tau: write temperature in (0, 1]; logits are divided by ``sqrt(dh) * tau``
            (Memformer Eq. 7, tau < 1 sharpens the write). Default 0.25.
    """

    slots: int = attrs.field(validator=_int_at_least(1))
    dim: int = attrs.field(validator=_int_at_least(1))
    heads: int = attrs.field(default=1, validator=_int_at_least(1))
    tau: float = attrs.field(default=0.25)

    @tau.validator
    def _check_tau(self, attribute: attrs.Attribute, value: Any) -> None:
        check_tau(value)

    def __init__(
        self,
        slots: int,
        dim: int,
        heads: int | None = None,
        tau: float = 0.25,
        *,
        num_heads: int | None = None,
    ) -> None:
        if heads is not None and num_heads is not None and heads != num_heads:
            raise MemcoreError(
                "`num_heads` and `heads` are one setting; give one of them. "
                f"Received: num_heads={num_heads!r}, heads={heads!r}"
            )
        chosen = num_heads if num_heads is not None else heads
        self.__attrs_init__(slots, dim, 1 if chosen is None else chosen, tau)

    @property
    def num_heads(self) -> int:
        """H, the same value as ``heads``."""
        return self.heads

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads != 0:
            raise MemcoreError(
                f"`dim` must be divisible by `heads` ({self.heads}). "
                f"Received: dim={self.dim}, heads={self.heads}"
            )

    @property
    def head_dim(self) -> int:
        """dh = D / H."""
        return self.dim // self.heads


@attrs.frozen
class SABConfig:
    """Sparse Attentive Backtracking settings (SAB Alg. 1).

    Attributes:
        k_top: memories that can receive weight per read (the threshold is the
            ``min(k_top + 1, N)``-th largest score).
        k_att: a memory is written after every step t (1-based) with ``t % k_att == 0``.
        k_trunc: truncated-BPTT chunk length; (h, c) is cut entering steps 1 + m * k_trunc.
        eps: added to the normalizer of the sparse weights.
        threshold_grad: let gradient flow through the threshold (the authors' release does).
        block_score_grad: stop gradient from the scorer into h_hat and the memories.
        include_h0_memory: put the initial h into the memory, as the authors' code does.
        scorer: "memcore" (the paper's ``w3 . tanh(m w1 + h_hat w2)``, params w1, w2, w3)
            or "release" (the authors' release: ``w_score . tanh([h_hat; m])``, one
            parameter ``w_score`` (2 Hd,) in place of w1, w2, w3).
        sparsify: "memcore" (threshold = the (k_top+1)-th largest score, by value) or
            "release" (the k_top-th largest + eps, so k_top - 1 memories; raw scores as
            weights when N <= k_top; with threshold_grad, all of the threshold's gradient
            goes to the one index a stable descending sort puts at position k_top).
        truncation: "memcore" ((h, c) cut entering 1-based steps 1 + m k_trunc) or
            "release" (cut entering 1-based steps m k_trunc, i.e. 0-based k_trunc - 1,
            2 k_trunc - 1, ...); see :attr:`trunc_phase`.
        (docs/semantics.md, "Release-compatible mode", lists every difference.)
    """

    k_top: int = attrs.field(default=5, validator=_int_at_least(1))
    k_att: int = attrs.field(default=10, validator=_int_at_least(1))
    k_trunc: int = attrs.field(default=10, validator=_int_at_least(1))
    eps: float = attrs.field(default=1e-7)
    threshold_grad: bool = attrs.field(default=False, validator=_bool)
    block_score_grad: bool = attrs.field(default=False, validator=_bool)
    include_h0_memory: bool = attrs.field(default=False, validator=_bool)
    scorer: str = attrs.field(default="memcore", validator=_choice("memcore", "release"))
    sparsify: str = attrs.field(default="memcore", validator=_choice("memcore", "release"))
    truncation: str = attrs.field(default="memcore", validator=_choice("memcore", "release"))

    @eps.validator
    def _check_eps(self, attribute: attrs.Attribute, value: Any) -> None:
        check_eps(value)

    @property
    def trunc_phase(self) -> int:
        """p: (h, c) is cut entering every 1-based step t > 1 with (t - 1) % k_trunc == p;
        0 for truncation "memcore", k_trunc - 1 for "release"."""
        return self.k_trunc - 1 if self.truncation == "release" else 0
