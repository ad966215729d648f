"""Types shared by every backend's routing drivers (bptt, mrbp, sab_bptt, sab_sparse_replay).

Parameters travel as ordered dicts of arrays keyed by the names below; states are
arrays (Memformer memory) or tuples (SAB's (h, c)). The loss is linear in per-step
losses, which is what lets MRBP and sparse replay reproduce BPTT exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import attrs

from memcore.errors import MemcoreError

__all__ = ["Loss", "MEMFORMER_PARAMS", "RoutingResult", "SAB_PARAMS", "HEAD_PARAM"]

# memformer_step: r = memory_read(x_t, M_t; read_*), h = x_t + r, y_t = h,
# M_{t+1} = memory_write(M_t, h; write_*, v_bias)
MEMFORMER_PARAMS = ("read_wq", "read_wk", "read_wv", "read_wo", "write_wq", "write_wk", "write_wv", "v_bias")
# sab_step: lstm_cell(lstm_w, lstm_b), sparse_retrieve(w1, w2, w3), y_t = h v1 + s v2 + b_y
SAB_PARAMS = ("lstm_w", "lstm_b", "w1", "w2", "w3", "v1", "v2", "b_y")
# softmax cross-entropy applies a linear head: logits = y_t @ head_w  (head_w: (Dy, C))
HEAD_PARAM = "head_w"


def _kind(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in ("mse", "xent"):
        raise MemcoreError(f"`loss.kind` must be 'mse' or 'xent'. Received: kind={value!r}")


def _weights(value: Any) -> tuple[float, ...] | None:
    """None, or a sequence of finite real numbers as a tuple of floats (MemcoreError else)."""
    if value is None:
        return None
    bad = isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__")
    items: list[Any] = [] if bad else list(value)
    # numbers.Real covers NumPy's float and int scalars; bool is an int but not a weight.
    ok = not bad and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items)
    floats = tuple(float(v) for v in items) if ok else ()
    if not ok or not all(math.isfinite(v) for v in floats):
        raise MemcoreError(
            "`loss.weights` must be None or a sequence of finite real numbers, one per step. "
            f"Received: weights={value!r}"
        )
    return floats


@attrs.frozen
class Loss:
    """L = sum_t weight_t * loss(y_t, target_t).

    Attributes:
        kind: "mse" (mean over all elements of (y_t - target_t)^2; targets shaped like y_t)
            or "xent" (mean over positions of the softmax cross-entropy of y_t @ head_w
            against integer class targets; ``head_w`` is a parameter).
        weights: per-step weights (length T) or None for all ones.
    """

    kind: str = attrs.field(default="mse", validator=_kind)
    weights: tuple[float, ...] | None = attrs.field(default=None, converter=_weights)


@attrs.frozen
class RoutingResult:
    """What every routing driver returns.

    Attributes:
        loss: the scalar total loss L.
        grads: dL/dparam for every parameter (same keys as the params passed in).
        d_state0: dL/d(initial state): dM_0 (B, K, D) for Memformer; (dh_0, dc_0) for SAB.
        final_state: M_T for Memformer (carry it into the next rollout); (h_T, c_T) for SAB.
        peak_cache_bytes: bytes of caches and stored states held at the worst moment,
            counted from the arrays themselves.
        replayed_chunks: sparse replay only: 0-based indices of the chunks it replayed.
    """

    loss: float
    grads: Mapping[str, Any]
    d_state0: Any
    final_state: Any
    peak_cache_bytes: int
    replayed_chunks: tuple[int, ...] | None = None
