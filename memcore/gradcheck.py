"""Finite-difference checks of the reference's hand-written backward (float64 only).

The dot-product test: for random directions u (one per differentiable input) and a
random cotangent v, <u, J^T v> must equal <(f(x + e u) - f(x - e u)) / 2e, v>.
Backends are compared with the reference, never with finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from memcore.opspec import Sample

__all__ = ["FDResult", "dot_product_test", "op_dot_product_test"]


@attrs.frozen
class FDResult:
    """Outcome of one dot-product test."""

    analytic: float  # <u, J^T v>
    numeric: float  # <central difference, v>
    abs_error: float
    rel_error: float

    def ok(self, rtol: float = 1e-6, atol: float = 1e-9) -> bool:
        """abs error within atol + rtol * the larger magnitude (both required: an exact
        cancellation makes a pure relative error meaningless)."""
        return self.abs_error <= atol + rtol * max(abs(self.analytic), abs(self.numeric))


def _flat(out: Any) -> list[np.ndarray]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def dot_product_test(
    f: Callable[[Sequence[np.ndarray]], Any],
    vjp: Callable[[Sequence[np.ndarray], list[np.ndarray]], Sequence[np.ndarray | None]],
    xs: Sequence[np.ndarray],
    rng: np.random.Generator,
    *,
    differentiable: Sequence[bool] | None = None,
    eps: float = 1e-6,
) -> FDResult:
    """Compare a VJP with central differences along a random direction.

    Args:
        f: ``f(xs) -> out`` (array or tuple of arrays).
        vjp: ``vjp(xs, cotangents) -> grads`` (one per x; None where not differentiable).
        xs: float64 inputs.
        differentiable: which inputs get a direction (default all).
    """
    differentiable = differentiable or [True] * len(xs)
    us = [rng.standard_normal(x.shape) if d else None for x, d in zip(xs, differentiable)]
    outs = _flat(f(xs))
    vs = [rng.standard_normal(o.shape) for o in outs]
    grads = vjp(xs, vs)
    analytic = float(sum(np.vdot(u, g) for u, g in zip(us, grads) if u is not None))
    plus = [x + eps * u if u is not None else x for x, u in zip(xs, us)]
    minus = [x - eps * u if u is not None else x for x, u in zip(xs, us)]
    numeric = float(
        sum(np.vdot((p - m) / (2 * eps), v) for p, m, v in zip(_flat(f(plus)), _flat(f(minus)), vs))
    )
    err = abs(analytic - numeric)
    scale = max(abs(analytic), abs(numeric), 1e-12)
    return FDResult(analytic, numeric, err, err / scale)


def op_dot_product_test(name: str, sample: Sample, rng: np.random.Generator, eps: float = 1e-6) -> FDResult:
    """The dot-product test of reference op ``name`` on a float64 sample."""
    from memcore import reference
    from memcore.ops import get_op

    spec = get_op(name)

    def plain(xs: Sequence[np.ndarray]) -> Any:
        return reference.forward(name, *xs, **sample.attrs)[0]

    f = _masked_forward(name, sample) or plain

    def vjp(xs: Sequence[np.ndarray], vs: list[np.ndarray]) -> Sequence[np.ndarray | None]:
        _, cache = reference.forward(name, *xs, **sample.attrs)
        return reference.backward(name, cache, tuple(vs) if spec.multi_output else vs[0])

    return dot_product_test(f, vjp, sample.inputs, rng, differentiable=spec.differentiable, eps=eps)


def _masked_forward(name: str, sample: Sample) -> Callable[[Sequence[np.ndarray]], Any] | None:
    """The forward with its stop-gradients made literal: what the backward differentiates.

    ``sparsify`` with ``threshold_grad=False`` holds the threshold at its value at the
    sample; ``sparse_retrieve`` with ``block_score_grad`` feeds the scorer the sample's
    h_hat and memories as constants. Returns None when the op has no stop-gradient.
    """
    from memcore.reference import sab

    at = sample.attrs
    if name not in ("sparsify", "sparse_retrieve"):
        return None
    eps, k_top = at.get("eps", 1e-7), at["k_top"]
    tgrad = at.get("threshold_grad", False)

    def sparsify(scores: np.ndarray, base_scores: np.ndarray) -> np.ndarray:
        # The entry at the threshold sits on relu's kink, where relu'(0) := 0; holding the
        # active set of the sample fixed makes that choice literal.
        n = scores.shape[-1]
        if n == 0:
            return np.zeros_like(scores)
        base_thr = sab.kth_largest(base_scores, min(k_top + 1, n))
        thr = sab.kth_largest(scores, min(k_top + 1, n)) if tgrad else base_thr
        z = np.where(base_scores > base_thr, scores - thr, 0.0)
        denom = z.sum(axis=-1, keepdims=True) + eps
        return z / np.where(denom > 0, denom, 1.0)

    if name == "sparsify":
        base = sample.inputs[0]
        return lambda xs: sparsify(xs[0], base)

    h0, m0 = sample.inputs[:2]
    base_scores = sab.sab_scores_forward(*sample.inputs)[0]

    def retrieve(xs: Sequence[np.ndarray]) -> Any:
        h, m, w1, w2, w3 = xs
        if at.get("block_score_grad", False):
            a = sab.sab_scores_forward(h0, m0, w1, w2, w3)[0]
        else:
            a = sab.sab_scores_forward(h, m, w1, w2, w3)[0]
        w = sparsify(a, base_scores)
        return np.matmul(w[:, None, :], m)[:, 0, :], w

    return retrieve
