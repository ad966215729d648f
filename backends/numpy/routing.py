"""The routing contract on the numpy backend: the reference drivers, unchanged.

Arrays are NumPy arrays, so the backend's methods hand their arguments straight to
:mod:`memcore.reference.routing`, which validates them and never mutates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcore.reference import routing
from memcore.reference.routing.losses import DEFAULT_LOSS
from memcore.routing_types import Loss, RoutingResult

__all__ = ["NumpyRouting"]


class NumpyRouting:
    """``bptt``, ``mrbp``, ``sab_bptt`` and ``sab_sparse_replay`` of the routing contract."""

    def bptt(
        self,
        step: str,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
    ) -> RoutingResult:
        """Full BPTT of ``step`` ("memformer" or "sab"): :func:`memcore.reference.routing.bptt`."""
        return routing.bptt(
            step,
            params,
            xs,
            state0,
            targets,
            config=config,
            loss=loss,
            resets=resets,
            token_mask=token_mask,
            truncate_every=truncate_every,
        )

    def mrbp(
        self,
        params: Mapping[str, Any],
        xs: Any,
        M0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
        resets: Any = None,
        token_mask: Any = None,
        truncate_every: int | None = None,
    ) -> RoutingResult:
        """Memformer MRBP; see :func:`memcore.reference.routing.mrbp`."""
        return routing.mrbp(
            params,
            xs,
            M0,
            targets,
            config=config,
            loss=loss,
            resets=resets,
            token_mask=token_mask,
            truncate_every=truncate_every,
        )

    def sab_bptt(
        self,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
    ) -> RoutingResult:
        """SAB, whole chunk-truncated graph: :func:`memcore.reference.routing.sab_bptt`."""
        return routing.sab_bptt(params, xs, state0, targets, config=config, loss=loss)

    def sab_sparse_replay(
        self,
        params: Mapping[str, Any],
        xs: Any,
        state0: Any,
        targets: Any,
        *,
        config: Any,
        loss: Loss = DEFAULT_LOSS,
    ) -> RoutingResult:
        """SAB sparse replay; see :func:`memcore.reference.routing.sab_sparse_replay`."""
        return routing.sab_sparse_replay(params, xs, state0, targets, config=config, loss=loss)
