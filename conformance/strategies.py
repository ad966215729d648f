"""Hypothesis strategies: small shared sizes, then bounded values drawn in float64.

Values come from each op's declared sampler (``OpSpec.sample``) seeded by hypothesis, so
every backend and dtype sees the same float64 draws, cast down after drawing.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from memcore.ops import get_op
from memcore.opspec import Sample, Sizes

__all__ = ["sizes", "samples", "seeds"]

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def sizes(draw: st.DrawFn, *, allow_empty: bool = True) -> Sizes:
    """Small dims (glossary names). ``allow_empty`` lets L and N be 0."""
    low = 0 if allow_empty else 1
    return Sizes(
        B=draw(st.integers(1, 3), label="B"),
        L=draw(st.integers(low, 4), label="L"),
        K=draw(st.integers(1, 4), label="K"),
        H=draw(st.integers(1, 3), label="H"),
        dh=draw(st.integers(1, 3), label="dh"),
        I=draw(st.integers(1, 3), label="I"),
        Hd=draw(st.integers(1, 4), label="Hd"),
        N=draw(st.integers(low, 7), label="N"),
        A=draw(st.integers(1, 4), label="A"),
    )


@st.composite
def samples(draw: st.DrawFn, op: str, dtype: str = "float64", *, allow_empty: bool = True) -> Sample:
    """A valid call of ``op``: sizes, then values from the op's sampler with a drawn seed."""
    z = draw(sizes(allow_empty=allow_empty))
    seed = draw(seeds, label="seed")
    return get_op(op).sample(np.random.default_rng(seed), z, dtype)
