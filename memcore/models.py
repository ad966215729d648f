"""Configs of the models memcore ships; the models themselves live per backend.

:class:`MemformerConfig` configures the Memformer language model of
:mod:`memcore.backends.torch.memformer` (an ``nn.Module``) and
:mod:`memcore.backends.jax.memformer` (pure functions of a parameter pytree). It is frozen,
so it hashes and can be a static argument to ``jax.jit``; derive variants with
``attrs.evolve(config, layers=4)``. Importing this module imports neither torch nor JAX.
"""

from __future__ import annotations

from typing import Any

import attrs

from memcore.config import MemoryConfig, _bool, _int_at_least, check_tau
from memcore.errors import MemcoreError

__all__ = ["MemformerConfig"]


@attrs.frozen
class MemformerConfig:
    """A Memformer language model: encoder with a memory read in every layer, one write.

    Attributes:
        vocab: C, token ids in [0, C) for both inputs and targets.
        dim: D, the model, token and slot width; divisible by ``heads``.
        heads: H, heads of self-attention, memory read and memory write.
        layers: encoder layers (each: causal self-attention, memory read, FFN).
        slots: K, memory slots.
        tau: write temperature in (0, 1] (Memformer Eq. 7).
        ffn_mult: the FFN's hidden width over D.
        fused_write: torch only: write through the Triton kernels of
            ``backends/torch/triton_write.py`` where they can run (the torch op elsewhere);
            the JAX model ignores it.
    """

    vocab: int = attrs.field(validator=_int_at_least(2))
    dim: int = attrs.field(validator=_int_at_least(1))
    heads: int = attrs.field(default=1, validator=_int_at_least(1))
    layers: int = attrs.field(default=1, validator=_int_at_least(1))
    slots: int = attrs.field(default=8, validator=_int_at_least(1))
    tau: float = attrs.field(default=0.25)
    ffn_mult: int = attrs.field(default=4, validator=_int_at_least(1))
    fused_write: bool = attrs.field(default=False, validator=_bool)

    @tau.validator
    def _check_tau(self, attribute: attrs.Attribute, value: Any) -> None:
        check_tau(value)

    def __attrs_post_init__(self) -> None:
        if self.dim % self.heads != 0:
            raise MemcoreError(
                f"`dim` must be divisible by `heads` ({self.heads}). "
                f"Received: dim={self.dim}, heads={self.heads}"
            )

    @property
    def memory(self) -> MemoryConfig:
        """The memory's own config (K, D, H, tau), as the memory ops and drivers take it."""
        return MemoryConfig(slots=self.slots, dim=self.dim, heads=self.heads, tau=self.tau)
