"""Invariants of the reference ops on hypothesis-drawn inputs.

Memory rows are unit norm after every write; sparse weights are non-negative, sum to 1 up
to eps and have at most k_top non-zeros; a slot whose self logit dominates is unchanged;
no call ever mutates (or returns a view of) its inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import memcore
from memcore import reference as ref
from memcore.conformance.strategies import samples, seeds
from memcore.opspec import Sample


def _unit_norm(m: np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(np.linalg.norm(m.astype(np.float64), axis=-1), 1.0, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
@given(sample=st.data())
def test_memory_rows_unit_norm_after_every_write(dtype, tol, sample):
    """Each of several chained writes leaves every memory row at unit L2 norm."""
    s = sample.draw(samples("memory_write", dtype), label="write")
    memory, x, wq, wk, wv, v_bias = s.inputs
    memory = ref.memory_init(v_bias, batch_size=memory.shape[0])
    _unit_norm(memory, tol)
    rng = np.random.default_rng(sample.draw(seeds, label="token seed"))
    for _ in range(4):
        memory = ref.memory_write(memory, x, wq, wk, wv, v_bias, **s.attrs)
        assert memory.dtype == dtype
        _unit_norm(memory, tol)
        x = rng.uniform(-1, 1, size=x.shape).astype(dtype)


def _positive_part_sum(scores: np.ndarray, k_top: int) -> np.ndarray:
    """S = sum max(a - tau, 0) with tau the min(k_top+1, N)-th largest, computed independently."""
    n = scores.shape[-1]
    tau = -np.sort(-scores, axis=-1)[:, min(k_top + 1, n) - 1 : min(k_top + 1, n)]
    return np.clip(scores - tau, 0.0, None).sum(axis=-1)


@given(data=st.data())
def test_sparsify_weights_nonnegative_normalized_and_sparse(data):
    """w >= 0, at most min(k_top, N - 1) non-zeros, and sum w = S / (S + eps) (1 up to eps)."""
    s = data.draw(samples("sparsify"), label="sample")
    scores = s.inputs[0]
    k_top = data.draw(st.integers(1, 8), label="k_top")
    eps = data.draw(st.sampled_from([0.0, 1e-7, 1e-3]), label="eps")
    w = ref.sparsify(scores, k_top=k_top, eps=eps)
    n = scores.shape[-1]
    assert w.shape == scores.shape and np.all(w >= 0.0)
    nonzero = (w > 0).sum(axis=-1)
    assert np.all(nonzero <= (min(k_top, n - 1) if n else 0))
    if n == 0:
        return
    big_s = _positive_part_sum(scores, k_top)
    total = w.sum(axis=-1)
    live = big_s > 0
    np.testing.assert_allclose(total[live], big_s[live] / (big_s[live] + eps), rtol=1e-12)
    assert np.all(1.0 - total[live] <= eps / big_s[live] + 1e-12)
    assert np.all(total[~live] == 0.0)


@given(data=st.data())
def test_sparsify_distinct_scores_select_exactly_k_top(data):
    """With distinct scores and N > k_top exactly k_top memories get non-zero weight."""
    s = data.draw(samples("sparsify", allow_empty=False), label="sample")
    scores = s.inputs[0]
    n = scores.shape[-1]
    assume(n >= 2 and np.all(np.diff(np.sort(scores, axis=-1), axis=-1) > 0))
    k_top = data.draw(st.integers(1, n - 1), label="k_top")
    w = ref.sparsify(scores, k_top=k_top)
    assert np.all((w > 0).sum(axis=-1) == k_top)
    top = np.argsort(-scores, axis=-1)[:, :k_top]
    assert np.all(np.take_along_axis(w, top, axis=-1) > 0)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_dominant_self_logit_leaves_slot_unchanged(num_heads):
    """A slot whose self logit beats every token logit by far leaves slot attention unchanged."""
    rng = np.random.default_rng(0)
    b, k, l_tok, d = 2, 3, 5, 8
    # Every head slice of every slot has norm^2 = dh / D = 1 / H, so with wq = wk = c I the
    # self logit is c^2 / H / (sqrt(dh) tau) per head, while tokens of size 1e-3 stay near 0.
    memory = np.sign(rng.standard_normal((b, k, d))) / math.sqrt(d)
    x = rng.uniform(-1e-3, 1e-3, size=(b, l_tok, d))
    c = 40.0
    eye = np.eye(d) * c
    wv = rng.standard_normal((d, d))
    out = ref.slot_attention(memory, x, eye, eye, wv, num_heads=num_heads, tau=0.25)
    np.testing.assert_array_equal(out, memory)
    # A mask changes nothing then either, and the write is just BMN of the unchanged slot.
    v_bias = rng.standard_normal((k, d))
    mask = rng.random((b, l_tok)) < 0.5
    written = ref.memory_write(
        memory, x, eye, eye, wv, v_bias, num_heads=num_heads, tau=0.25, token_mask=mask
    )
    np.testing.assert_array_equal(written, ref.bmn(memory, v_bias))


def _arrays(sample: Sample) -> list[np.ndarray]:
    return list(sample.inputs) + [v for v in sample.attrs.values() if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("name", list(memcore.OPS))
@given(data=st.data())
def test_inputs_bit_identical_and_outputs_fresh(name, data):
    """Forward and backward (reference and numpy backend) leave inputs and cotangents untouched."""
    spec = memcore.get_op(name)
    dtype = data.draw(st.sampled_from(["float64", "float32"]), label="dtype")
    s = data.draw(samples(name, dtype), label="sample")
    before = [a.copy() for a in _arrays(s)]
    out, cache = ref.forward(name, *s.inputs, **s.attrs)
    outs = out if isinstance(out, tuple) else (out,)
    rng = np.random.default_rng(data.draw(seeds, label="cotangent seed"))
    cot = tuple(rng.standard_normal(o.shape).astype(o.dtype) for o in outs)
    cot_before = [c.copy() for c in cot]
    grads = ref.backward(name, cache, cot if spec.multi_output else cot[0])
    backend = memcore.get_backend("numpy")
    backend.vjp(name, s.inputs, s.attrs, cot if spec.multi_output else cot[0])
    for a, b in zip(_arrays(s) + list(cot), before + cot_before):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (
            f"{name} mutated an input"
        )
    for t in outs + tuple(g for g in grads if g is not None):
        for a in _arrays(s):
            assert not np.shares_memory(t, a), f"{name} returned a view of an input"
