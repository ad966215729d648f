"""Deliberately broken backends (mutants) for the suite's meta-tests.

Each wraps the numpy backend and breaks one thing; the meta-tests assert that the check
meant to catch it fails (and, where the break is local, only that check):

* :class:`ScaledBackward`: one op's gradients multiplied by a wrong factor -> ``vjp``.
* :class:`Float32GradientDrift`: one op's float32 gradients off by 0.1% (a fused float32
  kernel's typical bug), float64 exact -> float32 ``vjp`` only.
* :class:`ThresholdOffByOne`: sparsify's threshold is the ``k_top``-th largest score
  instead of the ``(k_top + 1)``-th -> ``forward`` and ``vjp`` of sparsify and sparse_retrieve.
* :class:`ReplayWithoutChunkCut`: sparse replay's gradients lack the stop-gradient at
  chunk boundaries -> ``sparse_replay_vs_*``.
* :class:`MrbpIgnoresTruncation`: MRBP drops ``truncate_every`` (its stop-gradient) -> ``mrbp_vs_*``.
* :class:`Mutating`: one op's forward writes into its first input -> ``no_mutation``.
* :class:`WrongDtype`: one op's forward returns float64 for float32 inputs -> ``preserve``.
* :class:`NoFloat64`: a correct backend whose device lacks float64 -> float64 checks skipped.
"""

from __future__ import annotations

from typing import Any

import attrs

from memcore.backends.numpy import NumpyBackend
from memcore.protocol import Capabilities
from memcore.reference import sab

__all__ = [
    "MUTANTS",
    "MrbpIgnoresTruncation",
    "Mutating",
    "NoFloat64",
    "Float32GradientDrift",
    "ReplayWithoutChunkCut",
    "ScaledBackward",
    "ThresholdOffByOne",
    "WrongDtype",
]


class ScaledBackward(NumpyBackend):
    """``op``'s gradients are ``scale`` times the right ones (a dropped or doubled factor)."""

    def __init__(self, op: str = "memory_read", scale: float = 2.0) -> None:
        self.target, self.scale = op, scale
        self.name = f"mutant-scaled-{op}"

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        out, grads = super()._vjp(op, inputs, attributes, cotangent)
        if op == self.target:
            grads = tuple(None if g is None else g * self.scale for g in grads)
        return out, grads


class Float32GradientDrift(NumpyBackend):
    """``op``'s gradients are ``1 + drift`` times the right ones, in float32 only."""

    def __init__(self, op: str = "memory_read", drift: float = 1e-3) -> None:
        self.target, self.drift = op, drift
        self.name = f"mutant-float32-drift-{op}"

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        out, grads = super()._vjp(op, inputs, attributes, cotangent)
        if op == self.target and inputs[0].dtype == "float32":
            factor = inputs[0].dtype.type(1 + self.drift)
            grads = tuple(None if g is None else g * factor for g in grads)
        return out, grads


def _off_by_one_sparsify(
    scores: Any, k_top: int, eps: float, threshold_grad: bool
) -> tuple[Any, Any]:
    # The bug: the min(k_top, N)-th largest score, where the spec says min(k_top + 1, N).
    n = scores.shape[-1]
    if n == 0:
        return sab.sparsify_forward(scores, k_top=k_top, eps=eps, threshold_grad=threshold_grad)
    return sab.sparsify_with_threshold(
        scores, sab.kth_largest(scores, min(k_top, n)), eps, threshold_grad
    )


class ThresholdOffByOne(NumpyBackend):
    """sparsify / sparse_retrieve threshold at the k_top-th largest score (one too high)."""

    name = "mutant-threshold-off-by-one"

    def _run(self, op: str, inputs: tuple[Any, ...], at: dict[str, Any]) -> tuple[Any, Any]:
        if op == "sparsify":
            return _off_by_one_sparsify(inputs[0], at["k_top"], at["eps"], at["threshold_grad"])
        h_hat, memories, w1, w2, w3 = inputs
        scores, sc = sab.sab_scores_forward(h_hat, memories, w1, w2, w3)
        w, sp = _off_by_one_sparsify(scores, at["k_top"], at["eps"], at["threshold_grad"])
        s = (w[:, None, :] @ memories)[:, 0, :]
        return (s, w), sab.RetrieveCache(sc, sp, memories, w, at["block_score_grad"])

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        if op in ("sparsify", "sparse_retrieve"):
            return self._run(op, inputs, attributes)[0]
        return super()._forward(op, inputs, attributes)

    def _vjp(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any], cotangent: Any):
        if op == "sparsify":
            out, cache = self._run(op, inputs, attributes)
            return out, sab.sparsify_backward(cache, cotangent)
        if op == "sparse_retrieve":
            out, cache = self._run(op, inputs, attributes)
            return out, sab.sparse_retrieve_backward(cache, tuple(cotangent))
        return super()._vjp(op, inputs, attributes, cotangent)


class ReplayWithoutChunkCut(NumpyBackend):
    """Sparse replay that forgets the stop-gradient on (h, c) at chunk boundaries.

    It reports the replayed chunks of the correct replay, so only its gradients are wrong.
    """

    name = "mutant-replay-without-chunk-cut"

    def sab_sparse_replay(self, params: Any, xs: Any, state0: Any, targets: Any, **kw: Any) -> Any:
        right = super().sab_sparse_replay(params, xs, state0, targets, **kw)
        uncut = super().bptt("sab", params, xs, state0, targets, **kw)
        return attrs.evolve(right, grads=uncut.grads, d_state0=uncut.d_state0)


class MrbpIgnoresTruncation(NumpyBackend):
    """MRBP without the stop-gradient on M every ``truncate_every`` steps."""

    name = "mutant-mrbp-ignores-truncation"

    def mrbp(self, params: Any, xs: Any, M0: Any, targets: Any, **kw: Any) -> Any:
        return super().mrbp(params, xs, M0, targets, **{**kw, "truncate_every": None})


class Mutating(NumpyBackend):
    """``op``'s forward halves its first input in place after computing the (right) result."""

    def __init__(self, op: str = "bmn") -> None:
        self.target = op
        self.name = f"mutant-mutating-{op}"

    def forward(self, op: str, *inputs: Any, **attributes: Any) -> Any:
        out = super().forward(op, *inputs, **attributes)
        if op == self.target:
            inputs[0][...] = inputs[0] * 0.5
        return out


class WrongDtype(NumpyBackend):
    """``op``'s forward computes and returns float64 whatever the input dtype."""

    def __init__(self, op: str = "bmn") -> None:
        self.target = op
        self.name = f"mutant-wrong-dtype-{op}"

    def _forward(self, op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> Any:
        if op == self.target:
            inputs = tuple(x.astype("float64") for x in inputs)
        return super()._forward(op, inputs, attributes)


class NoFloat64(NumpyBackend):
    """The numpy backend on a pretend device without float64 (like MPS)."""

    name = "fake-no-float64"

    def capabilities(self, device: str | None = None) -> Capabilities:
        return Capabilities(dtypes=("float32",), autodiff="hand-written", dlpack=False)


MUTANTS = (
    ScaledBackward,
    Float32GradientDrift,
    ThresholdOffByOne,
    ReplayWithoutChunkCut,
    MrbpIgnoresTruncation,
    Mutating,
    WrongDtype,
)
