"""Per-step losses with hand-written backward: mean squared error and softmax cross-entropy.

The total loss is ``L = sum_t weight_t * l_t``; it is linear in the per-step losses, which
is what lets MRBP and sparse replay reproduce BPTT's gradient exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from memcore.reference._xp import arange, array_namespace, mT
from memcore.routing_types import Loss

__all__ = ["DEFAULT_LOSS", "LossCache", "loss_backward", "loss_forward", "step_weights"]

# Loss is frozen, so one shared default instance is safe: mse with unit weights.
DEFAULT_LOSS = Loss()


class LossCache(NamedTuple):
    kind: str
    y: Any  # (P, Dy): the step output, positions flattened
    resid: Any  # mse: y - target (P, Dy); xent: softmax probabilities minus one-hot (P, C)
    head_w: Any  # (Dy, C) for xent, else None
    shape: tuple[int, ...]  # y's original shape


def loss_forward(kind: str, y: Any, target: Any, head_w: Any = None) -> tuple[float, LossCache]:
    """One step's loss l_t.

    Args:
        kind: "mse": mean over every element of (y - target)^2, target shaped like y.
            "xent": mean over positions of -log softmax(y @ head_w)[target], target (...,)
            integer class ids for the positions of y (..., Dy).
        y: (..., Dy) the step output; Memformer (B, L, D), SAB (B, O).
        target: see ``kind``.
        head_w: (Dy, C) for "xent".

    Returns:
        (l_t as a Python float, cache).
    """
    xp = array_namespace(y)
    flat = xp.reshape(y, (-1, y.shape[-1]))
    if kind == "mse":
        resid = flat - xp.reshape(target, flat.shape)
        return float(xp.mean(resid * resid)), LossCache(kind, flat, resid, None, tuple(y.shape))
    logits = xp.matmul(flat, head_w)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)  # exp stays finite
    e = xp.exp(shifted)
    z = xp.sum(e, axis=-1, keepdims=True)
    classes = arange(xp, head_w.shape[-1], y)
    onehot = _as_dtype(xp, xp.reshape(target, (-1, 1)) == classes, y.dtype)
    nll = xp.log(z)[:, 0] - xp.sum(shifted * onehot, axis=-1)
    return float(xp.mean(nll)), LossCache(kind, flat, e / z - onehot, head_w, tuple(y.shape))


def _as_dtype(xp: Any, x: Any, dtype: Any) -> Any:
    # Array API namespaces spell it xp.astype; NumPy < 2.1 and CuPy use the method.
    return xp.astype(x, dtype) if hasattr(xp, "astype") else x.astype(dtype)


def loss_backward(cache: LossCache, d_loss: float) -> tuple[Any, Any]:
    """(dy shaped like y, dhead_w (Dy, C) or None) for d l_t = ``d_loss``.

    mse: dy = 2 (y - target) / (number of elements) * d_loss.
    xent: dlogits = (softmax - onehot) / P * d_loss over P positions; dy = dlogits head_w^T,
    dhead_w = y^T dlogits.
    """
    xp = array_namespace(cache.y)
    if cache.kind == "mse":
        n = cache.resid.shape[0] * cache.resid.shape[1]
        return xp.reshape(cache.resid * (2.0 * d_loss / n), cache.shape), None
    d_logits = cache.resid * (d_loss / cache.resid.shape[0])
    dy = xp.matmul(d_logits, mT(xp, cache.head_w))
    return xp.reshape(dy, cache.shape), xp.matmul(mT(xp, cache.y), d_logits)


def step_weights(weights: tuple[float, ...] | None, steps: int) -> tuple[float, ...]:
    """The per-step weights: ``weights`` or all ones (length already validated)."""
    return tuple(weights) if weights is not None else (1.0,) * steps
