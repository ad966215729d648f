"""The reference's hand-written backward of every op against central finite differences.

The dot-product test of :mod:`memcore.gradcheck` in float64 on hypothesis-drawn shapes and
values, for every op of ``memcore.OPS`` and every stop-gradient variant; plus a float32
forward sanity check against the float64 forward on the same draws.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import memcore
from memcore import reference as ref
from memcore.conformance.strategies import samples, seeds
from memcore.gradcheck import op_dot_product_test
from memcore.opspec import Sample

# (op, attribute overrides): every op once, plus the variants whose backward differs.
VARIANTS = [(name, {}) for name in memcore.OPS] + [
    ("slot_attention", {"token_mask": None, "tau": 0.1}),
    ("memory_write", {"token_mask": None, "tau": 1.0}),
    ("sparsify", {"threshold_grad": True}),
    ("sparsify", {"eps": 0.0}),
    ("sparse_retrieve", {"threshold_grad": True}),
    ("sparse_retrieve", {"block_score_grad": True}),
    ("sparse_retrieve", {"threshold_grad": True, "block_score_grad": True}),
]


def _ids(v: tuple[str, dict]) -> str:
    name, over = v
    return name + "".join(f"-{k}={val}" for k, val in over.items())


def _scores(name: str, sample: Sample) -> np.ndarray | None:
    if name == "sparsify":
        return sample.inputs[0]
    if name == "sparse_retrieve":
        return ref.sab_scores(*sample.inputs)
    return None


def _min_gap(scores: np.ndarray) -> float:
    """Smallest distance between two scores of one row (inf with fewer than two)."""
    if scores.shape[-1] < 2:
        return np.inf
    return float(np.diff(np.sort(scores, axis=-1), axis=-1).min())


def _describe(name: str, sample: Sample) -> str:
    shapes = [tuple(x.shape) for x in sample.inputs]
    scalars = {k: v for k, v in sample.attrs.items() if not hasattr(v, "shape")}
    return f"op={name} shapes={shapes} attrs={scalars}"


@pytest.mark.parametrize("variant", VARIANTS, ids=[_ids(v) for v in VARIANTS])
@given(data=st.data())
def test_backward_matches_finite_differences(variant, data):
    """<u, J^T v> from the hand-written backward equals the central difference, float64."""
    name, over = variant
    base = data.draw(samples(name, "float64"), label="sample")
    sample = Sample(base.inputs, {**base.attrs, **over})
    scores = _scores(name, sample)
    if scores is not None:
        # Two reasons to keep scores apart: the threshold is an order statistic, so a near-tie
        # within the FD step lets the difference jump between entries; and w = z / sum(z)
        # has curvature ~ 1 / gap^3, so the O(h^2) truncation error needs gap >> h = 1e-6.
        assume(_min_gap(scores) > 1e-2)
    rng = np.random.default_rng(data.draw(seeds, label="direction seed"))
    result = op_dot_product_test(name, sample, rng)
    assert result.ok(), f"{_describe(name, sample)} {result}"


@pytest.mark.parametrize("name", list(memcore.OPS))
@given(data=st.data())
def test_float32_forward_tracks_float64(name, data):
    """The float32 forward keeps float32 and stays close to the float64 forward on equal values."""
    s64 = data.draw(samples(name, "float64"), label="sample")
    scores = _scores(name, s64)
    if scores is not None:
        # Casting to float32 must not reorder near-tied scores around the threshold.
        assume(_min_gap(scores) > 1e-3)
    s32 = Sample(tuple(x.astype(np.float32) for x in s64.inputs), s64.attrs)
    out64 = ref.forward(name, *s64.inputs, **s64.attrs)[0]
    out32 = ref.forward(name, *s32.inputs, **s32.attrs)[0]
    out64 = out64 if isinstance(out64, tuple) else (out64,)
    out32 = out32 if isinstance(out32, tuple) else (out32,)
    for a32, a64 in zip(out32, out64):
        assert a32.dtype == np.float32, f"{_describe(name, s32)} gave {a32.dtype}"
        assert np.all(np.isfinite(a32))
        np.testing.assert_allclose(a32, a64, rtol=1e-3, atol=1e-4, err_msg=_describe(name, s32))
