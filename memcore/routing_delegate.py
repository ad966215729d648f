"""The routing contract's four methods, delegated to a module of driver functions.

A backend whose drivers live in a module with ``bptt``, ``mrbp``, ``sab_bptt`` and
``sab_sparse_replay`` (the contract's signatures; docs/semantics.md, "Routing (time)")
mixes this in and names the module in ``routing_module``; the module is imported on
first use. Extra keyword options a backend's drivers accept (e.g. JAX's
``mrbp(method=...)``) pass through unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from memcore.routing_types import Loss, RoutingResult

__all__ = ["RoutingDelegate"]

_DEFAULT_LOSS = Loss()


class RoutingDelegate:
    """Mixin: ``bptt``, ``mrbp``, ``sab_bptt``, ``sab_sparse_replay`` from ``routing_module``."""

    routing_module: str = "memcore.reference.routing"

    def _drivers(self) -> ModuleType:
        return importlib.import_module(self.routing_module)

    def bptt(
        self,
        step: str,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = _DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
        **options: Any,
    ) -> RoutingResult:
        """Full BPTT of ``step`` ("memformer" or "sab"): every step kept, one reverse sweep."""
        return self._drivers().bptt(
            step, params, xs, state0, targets, config=config, loss=loss, resets=resets,
            token_mask=token_mask, truncate_every=truncate_every, **options,
        )

    def mrbp(
        self,
        params: Mapping[str, Any],
        xs: Any,
        M0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = _DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
        **options: Any,
    ) -> RoutingResult:
        """Memformer MRBP (Alg. 1): keep M_0..M_T, recompute and back-propagate step by step."""
        return self._drivers().mrbp(
            params, xs, M0, targets, config=config, loss=loss, resets=resets,
            token_mask=token_mask, truncate_every=truncate_every, **options,
        )

    def sab_bptt(
        self, params: Mapping[str, Any], xs: Any, state0: Any, targets: Any, *,
        config: Any, loss: Loss = _DEFAULT_LOSS, **options: Any,
    ) -> RoutingResult:
        """SAB with chunked truncation, the whole masked graph kept."""
        return self._drivers().sab_bptt(params, xs, state0, targets, config=config, loss=loss, **options)

    def sab_sparse_replay(
        self, params: Mapping[str, Any], xs: Any, state0: Any, targets: Any, *,
        config: Any, loss: Loss = _DEFAULT_LOSS, **options: Any,
    ) -> RoutingResult:
        """SAB sparse replay: chunk-boundary states and memories only, chunks replayed in reverse."""
        return self._drivers().sab_sparse_replay(
            params, xs, state0, targets, config=config, loss=loss, **options
        )
