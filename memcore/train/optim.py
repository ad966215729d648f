"""Adam with global-norm gradient clipping, written with array operators only.

Nothing here calls a framework function: ``*``, ``+``, ``/``, ``**`` and ``.sum()`` exist
on NumPy, torch, JAX and CuPy arrays alike, so one optimizer serves every backend and its
state (``m``, ``v``, the step count) round-trips through a checkpoint as NumPy arrays.
Python-float scalars keep the arrays' dtype (weak typing in torch/JAX, NEP 50 in NumPy).

The update is torch.optim.Adam's (Kingma & Ba, Alg. 1, with the bias corrections folded
as torch folds them), and clipping is torch.nn.utils.clip_grad_norm_'s rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from memcore.reference._xp import array_namespace
from memcore.train.config import OptimConfig

__all__ = ["AdamState", "adam_init", "adam_update", "clip_by_global_norm", "global_norm"]


@attrs.frozen
class AdamState:
    """Adam's state: the step count t and the moment estimates m, v (one array per param)."""

    step: int
    m: Mapping[str, Any]
    v: Mapping[str, Any]


def adam_init(params: Mapping[str, Any]) -> AdamState:
    """t = 0 and zero moments shaped like ``params``."""
    zeros = {k: p * 0.0 for k, p in params.items()}
    return AdamState(0, zeros, dict(zeros))


def global_norm(grads: Mapping[str, Any]) -> float:
    """sqrt(sum over every gradient entry of g^2), as a Python float."""
    return math.sqrt(sum(_sum_of_squares(g) for g in grads.values()))


def _sum_of_squares(g: Any) -> float:
    # NumPy, torch and JAX arrays have a .sum() method; Array API objects (array-api-strict)
    # need their namespace's sum.
    sq = g * g
    if hasattr(sq, "sum"):
        return float(sq.sum())
    return float(array_namespace(sq).sum(sq))


def clip_by_global_norm(grads: Mapping[str, Any], max_norm: float) -> tuple[dict[str, Any], float]:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) (clip_grad_norm_'s rule).

    Args:
        grads: name -> gradient array.
        max_norm: the largest global norm kept; 0 disables clipping.

    Returns:
        (the clipped gradients, the global norm before clipping).
    """
    norm = global_norm(grads)
    if max_norm <= 0.0:
        return dict(grads), norm
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return dict(grads), norm
    return {k: g * coef for k, g in grads.items()}, norm


def adam_update(
    params: Mapping[str, Any], grads: Mapping[str, Any], state: AdamState, config: OptimConfig
) -> tuple[dict[str, Any], AdamState, float]:
    """One clipped Adam step; inputs are never modified.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Args:
        params, grads: name -> array, the same keys.
        state: the previous :class:`AdamState`.
        config: lr, betas, eps and clip_norm.

    Returns:
        (new params, new state, the gradient's global norm before clipping).
    """
    grads, norm = clip_by_global_norm(grads, config.clip_norm)
    b1, b2 = config.beta1, config.beta2
    t = state.step + 1
    step_size = config.lr / (1.0 - b1**t)
    root_c2 = math.sqrt(1.0 - b2**t)
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = state.m[k] * b1 + g * (1.0 - b1)
        v = state.v[k] * b2 + (g * g) * (1.0 - b2)
        new_p[k] = p - (m / ((v**0.5) / root_c2 + config.eps)) * step_size
        new_m[k], new_v[k] = m, v
    return new_p, AdamState(t, new_m, new_v), norm
