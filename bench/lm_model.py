"""The benchmarks' Memformer LM: :class:`memcore.backends.torch.memformer.MemformerLM`.

The model lives in the library now; this module keeps the benchmarks' positional
constructor, ``MemformerLM(vocab, dim, heads, layers, slots, tau=0.25, fused_write=False)``,
and builds the library model from a :class:`memcore.models.MemformerConfig`. Same modules,
parameter names, initialization order and math as before, so the committed figures hold.
"""

from __future__ import annotations

from memcore.backends.torch.memformer import EncoderLayer
from memcore.backends.torch.memformer import MemformerLM as _LibraryLM
from memcore.models import MemformerConfig

__all__ = ["EncoderLayer", "MemformerLM"]


class MemformerLM(_LibraryLM):
    """The library LM with the benchmarks' positional arguments (see the module docstring)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        heads: int,
        layers: int,
        slots: int,
        tau: float = 0.25,
        fused_write: bool = False,
    ) -> None:
        config = MemformerConfig(
            vocab=vocab,
            dim=dim,
            heads=heads,
            layers=layers,
            slots=slots,
            tau=tau,
            fused_write=fused_write,
        )
        super().__init__(config)
