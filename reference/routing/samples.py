"""Valid random calls of the routing drivers, for tests, the conformance suite and benches.

Values are bounded (projections scaled by sqrt(3 / fan_in)), drawn in float64 from the
given generator and cast down afterwards, so every backend and dtype sees the same draw.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from memcore.config import MemoryConfig, SABConfig
from memcore.routing_types import HEAD_PARAM, MEMFORMER_PARAMS, SAB_PARAMS, Loss

__all__ = ["RoutingSample", "memformer_sample", "sab_sample"]


@attrs.frozen
class RoutingSample:
    """One driver call: ``driver(params, xs, state0, targets, config=config, loss=loss, **extra)``.

    Attributes:
        params: name -> array (+ head_w for loss "xent").
        xs, state0, targets: the arrays of the call.
        config: MemoryConfig or SABConfig.
        loss: the Loss.
        extra: Memformer's resets / token_mask (None when not drawn).
    """

    params: dict[str, np.ndarray]
    xs: np.ndarray
    state0: Any
    targets: np.ndarray
    config: Any
    loss: Loss
    extra: dict[str, Any] = attrs.field(factory=dict)


def _u(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=shape) * scale


def _proj(rng: np.random.Generator, d_in: int, d_out: int) -> np.ndarray:
    return _u(rng, (d_in, d_out), np.sqrt(3.0 / d_in))


def _weights(rng: np.random.Generator, steps: int, zero_prob: float) -> tuple[float, ...] | None:
    if zero_prob <= 0.0:
        return None
    w = rng.uniform(0.1, 2.0, size=steps)
    return tuple(float(v) for v in np.where(rng.random(steps) < zero_prob, 0.0, w))


def memformer_sample(
    rng: np.random.Generator,
    *,
    T: int = 4,
    B: int = 2,
    L: int = 3,
    K: int = 3,
    D: int = 4,
    H: int = 2,
    tau: float = 0.5,
    kind: str = "mse",
    C: int = 3,
    resets: bool = False,
    token_mask: bool = False,
    zero_weight_prob: float = 0.0,
    dtype: str = "float64",
) -> RoutingSample:
    """A Memformer call with xs (T, B, L, D), M_0 (B, K, D) on the unit sphere (as BMN writes).

    ``resets`` draws (T, B) flags (each True with probability 0.25); ``token_mask`` draws
    (T, B, L) flags (each True with probability 0.7); ``zero_weight_prob`` zeroes loss weights.
    """
    params = {name: _proj(rng, D, D) for name in MEMFORMER_PARAMS[:-1]}
    params["v_bias"] = _u(rng, (K, D))
    m0 = _u(rng, (B, K, D))
    m0 = m0 / np.linalg.norm(m0, axis=-1, keepdims=True)
    xs = _u(rng, (T, B, L, D))
    if kind == "xent":
        params[HEAD_PARAM] = _proj(rng, D, C)
        targets = rng.integers(0, C, size=(T, B, L))
    else:
        targets = _u(rng, (T, B, L, D))
    extra = {
        "resets": rng.random((T, B)) < 0.25 if resets else None,
        "token_mask": rng.random((T, B, L)) < 0.7 if token_mask else None,
    }
    cast = {k: v.astype(dtype) for k, v in params.items()}
    tg = targets if kind == "xent" else targets.astype(dtype)
    loss = Loss(kind, _weights(rng, T, zero_weight_prob))
    config = MemoryConfig(slots=K, dim=D, heads=H, tau=tau)
    return RoutingSample(cast, xs.astype(dtype), m0.astype(dtype), tg, config, loss, extra)


def sab_sample(
    rng: np.random.Generator,
    *,
    T: int = 6,
    B: int = 2,
    I: int = 2,
    Hd: int = 3,
    A: int = 3,
    O: int = 2,
    config: SABConfig | None = None,
    kind: str = "mse",
    C: int = 3,
    zero_weight_prob: float = 0.0,
    dtype: str = "float64",
) -> RoutingSample:
    """A SAB call with xs (T, B, I), (h0, c0) each (B, Hd) and targets (T, B, O) or (T, B)."""
    config = config or SABConfig(k_top=2, k_att=2, k_trunc=3)
    params = {
        "lstm_w": _proj(rng, I + Hd, 4 * Hd),
        "lstm_b": _u(rng, (4 * Hd,), 0.5),
        "w1": _proj(rng, Hd, A),
        "w2": _proj(rng, Hd, A),
        "w3": _u(rng, (A,), 1.5),
        "v1": _proj(rng, Hd, O),
        "v2": _proj(rng, Hd, O),
        "b_y": _u(rng, (O,), 0.5),
    }
    assert tuple(params) == SAB_PARAMS
    state0 = (_u(rng, (B, Hd)), _u(rng, (B, Hd)))
    xs = _u(rng, (T, B, I))
    if kind == "xent":
        params[HEAD_PARAM] = _proj(rng, O, C)
        targets = rng.integers(0, C, size=(T, B))
    else:
        targets = _u(rng, (T, B, O))
    cast = {k: v.astype(dtype) for k, v in params.items()}
    tg = targets if kind == "xent" else targets.astype(dtype)
    loss = Loss(kind, _weights(rng, T, zero_weight_prob))
    s0 = tuple(s.astype(dtype) for s in state0)
    return RoutingSample(cast, xs.astype(dtype), s0, tg, config, loss)
