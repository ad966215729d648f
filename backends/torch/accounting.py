"""Memory accounting of the torch routing drivers (``RoutingResult.peak_cache_bytes``).

Counted: bytes of the distinct tensor storages that
autograd saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``)
plus the states a driver stores itself (MRBP's M_0..M_T; the SAB drivers' memory bank
(N_max, B, Hd), allocated whole; sparse replay's chunk-boundary (h, c), where a boundary h
that is also a memory is a view of the bank and counts once), at the worst moment.
Storages the caller holds anyway (parameters, xs, targets, masks) are not counted; a
storage is counted once however many views of it are saved. Gradient accumulators are
not caches (docs/semantics.md R.7): parameter grads and the SAB bank's memory-gradient
accumulator (as large as the bank) are not counted. BPTT's worst moment is the end of the
forward (the whole graph); MRBP's is the stored memories plus the largest single-step
graph; sparse replay's is the stored states plus the largest single-chunk graph. With the
SAB drivers' default ``retrieval="fast"`` a step saves h_hat and the top min(k_top + 1, N)
scores and indices (all N with threshold_grad), not the (B, N, Hd) memories, so a chunk's
graph does not grow with N.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["SavedBytes", "held_tensors", "nbytes_of", "storage_key"]


class SavedBytes:
    """Counts the distinct storages autograd saves for backward inside a ``with`` block.

    Args:
        exclude: tensors whose storages are not counted (held by the caller anyway).
    """

    def __init__(self, exclude: Sequence[Any] = ()) -> None:
        self._skip = {storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self._skip and key not in self._seen:
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def storage_key(t: torch.Tensor) -> int:
    """The address of a tensor's storage: views of one storage share it."""
    return t.untyped_storage().data_ptr()


def nbytes_of(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen = {storage_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def held_tensors(params: Mapping[str, Any], *others: Any) -> list[Any]:
    """The parameters and the other tensors given: storages the caller holds anyway."""
    return list(params.values()) + [o for o in others if isinstance(o, torch.Tensor)]
