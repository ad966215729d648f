"""Pieces the drivers share: parameter-gradient sums and the weighted loss cotangent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcore.reference._xp import array_namespace
from memcore.reference.routing.losses import LossCache, loss_backward
from memcore.routing_types import HEAD_PARAM

__all__ = ["GradSums", "loss_cotangent"]


class GradSums:
    """dL/dparam sums, one per parameter (fresh arrays; never written in place)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        xp = array_namespace(*params.values())
        self.sums = {name: xp.zeros_like(value) for name, value in params.items()}

    def add(self, grads: Mapping[str, Any]) -> None:
        for name, g in grads.items():
            if g is not None:
                self.sums[name] = self.sums[name] + g


def loss_cotangent(grads: GradSums, cache: LossCache, weight: float) -> Any:
    """dy_t for the term weight * l_t (adding the head's gradient to ``grads``).

    A zero weight returns None (a zero cotangent), so the step's backward skips the
    output VJP: exactly what zero times the loss gradient would give for finite losses.
    """
    if weight == 0.0:
        return None
    d_y, d_head = loss_backward(cache, weight)
    if d_head is not None:
        grads.add({HEAD_PARAM: d_head})
    return d_y
