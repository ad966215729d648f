"""The two routing steps: hand-written backward against central finite differences (float64).

The dot-product test of :func:`memcore.gradcheck.dot_product_test` on every input of a
step (parameters, x_t and the whole state, memories included) and every output
(state' and y_t). SAB's stop-gradients are made literal in the FD forward the way
:mod:`memcore.gradcheck` does for ``sparse_retrieve``: threshold and active set held at the
sample, scorer inputs held at the sample with ``block_score_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from memcore.config import MemoryConfig, SABConfig
from memcore.conformance.strategies import seeds
from memcore.gradcheck import _masked_forward, dot_product_test
from memcore.opspec import Sample
from memcore.reference import lstm, sab
from memcore.reference.steps import (
    STEPS,
    SabState,
    get_step,
    memformer_step,
    sab_step,
    stack_memories,
)
from memcore.routing_types import MEMFORMER_PARAMS, SAB_PARAMS


def _u(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.uniform(-scale, scale, size=shape)


def _min_gap(scores: np.ndarray) -> float:
    if scores.shape[-1] < 2:
        return np.inf
    return float(np.diff(np.sort(scores, axis=-1), axis=-1).min())


# ------------------------------------------------------------------ memformer_step
@given(
    B=st.integers(1, 2),
    L=st.integers(1, 3),
    K=st.integers(1, 3),
    H=st.integers(1, 2),
    dh=st.integers(1, 2),
    tau=st.sampled_from([0.25, 0.5, 1.0]),
    use_reset=st.booleans(),
    use_mask=st.booleans(),
    seed=seeds,
)
def test_memformer_step_backward_matches_finite_differences(
    B, L, K, H, dh, tau, use_reset, use_mask, seed
):
    """memformer_step's backward gives <u, J^T v> equal to the central difference for every input."""
    rng = np.random.default_rng(seed)
    D = H * dh
    config = MemoryConfig(slots=K, dim=D, heads=H, tau=tau)
    names = MEMFORMER_PARAMS
    xs = [_u(rng, D, D, scale=np.sqrt(3.0 / D)) for _ in names[:-1]] + [
        _u(rng, K, D),
        _u(rng, B, L, D),
        _u(rng, B, K, D),
    ]
    reset = rng.random(B) < 0.5 if use_reset else None
    mask = rng.random((B, L)) < 0.7 if use_mask else None

    def run(arrays: Sequence[np.ndarray]):
        params = dict(zip(names, arrays[:8]))
        return memformer_step.forward(
            params, arrays[8], arrays[9], config=config, reset=reset, token_mask=mask
        )

    def f(arrays):
        m, y, _ = run(arrays)
        return m, y

    def vjp(arrays, vs):
        _, _, cache = run(arrays)
        grads, dx, dm = memformer_step.backward(cache, vs[0], vs[1])
        return [grads[n] for n in names] + [dx, dm]

    result = dot_product_test(f, vjp, xs, np.random.default_rng(seed + 1))
    assert result.ok(), (
        f"B={B} L={L} K={K} H={H} dh={dh} tau={tau} reset={reset} mask={mask}: {result}"
    )


def test_memformer_step_none_memory_cotangent_equals_zero():
    """d_state=None (MRBP's last step) gives exactly the gradients of a zero memory cotangent."""
    rng = np.random.default_rng(3)
    config = MemoryConfig(slots=3, dim=4, heads=2)
    params = {n: _u(rng, 4, 4) for n in MEMFORMER_PARAMS[:-1]} | {"v_bias": _u(rng, 3, 4)}
    m, y, cache = memformer_step.forward(
        params, _u(rng, 2, 3, 4), _u(rng, 2, 3, 4), config=config, reset=np.array([True, False])
    )
    dy = _u(rng, *y.shape)
    skipped = memformer_step.backward(cache, None, dy)
    full = memformer_step.backward(cache, np.zeros_like(m), dy)
    for name in MEMFORMER_PARAMS:
        np.testing.assert_array_equal(skipped[0][name], full[0][name], err_msg=name)
    np.testing.assert_array_equal(skipped[1], full[1])
    np.testing.assert_array_equal(skipped[2], full[2])


# ------------------------------------------------------------------ sab_step
def _sab_inputs(rng, B, I, Hd, A, O, N):
    params = [
        _u(rng, I + Hd, 4 * Hd, scale=np.sqrt(3.0 / (I + Hd))),
        _u(rng, 4 * Hd, scale=0.5),
        _u(rng, Hd, A, scale=np.sqrt(3.0 / Hd)),
        _u(rng, Hd, A, scale=np.sqrt(3.0 / Hd)),
        _u(rng, A, scale=1.5),
        _u(rng, Hd, O),
        _u(rng, Hd, O),
        _u(rng, O, scale=0.5),
    ]
    return (
        params
        + [_u(rng, B, I), _u(rng, B, Hd), _u(rng, B, Hd)]
        + [_u(rng, B, Hd) for _ in range(N)]
    )


def _literal_sab_forward(base: Sequence[np.ndarray], config: SABConfig, t: int):
    """The SAB step with its stop-gradients literal: what sab_step.backward differentiates."""
    p = dict(zip(SAB_PARAMS, base[:8]))
    (h_hat0, _), _ = lstm.lstm_cell_forward(base[8], base[9], base[10], p["lstm_w"], p["lstm_b"])
    mem0 = stack_memories(tuple(base[11:]), h_hat0)
    attrs = {
        "k_top": config.k_top,
        "eps": config.eps,
        "threshold_grad": config.threshold_grad,
        "block_score_grad": config.block_score_grad,
    }
    retrieve = _masked_forward(
        "sparse_retrieve", Sample((h_hat0, mem0, p["w1"], p["w2"], p["w3"]), attrs)
    )

    def f(arrays: Sequence[np.ndarray]):
        q = dict(zip(SAB_PARAMS, arrays[:8]))
        (h_hat, c_new), _ = lstm.lstm_cell_forward(
            arrays[8], arrays[9], arrays[10], q["lstm_w"], q["lstm_b"]
        )
        mems = tuple(arrays[11:])
        s, _ = retrieve([h_hat, stack_memories(mems, h_hat), q["w1"], q["w2"], q["w3"]])
        h = h_hat + s
        y = h @ q["v1"] + s @ q["v2"] + q["b_y"]
        return (h, c_new, y) + mems + ((h,) if t % config.k_att == 0 else ())

    return f


@pytest.mark.parametrize("fd_forward", ["literal", "plain"])
@given(
    B=st.integers(1, 2),
    I=st.integers(1, 2),
    Hd=st.integers(1, 3),
    A=st.integers(1, 3),
    O=st.integers(1, 2),
    N=st.integers(0, 5),
    k_top=st.integers(1, 4),
    k_att=st.integers(1, 2),
    t=st.integers(1, 4),
    threshold_grad=st.booleans(),
    block_score_grad=st.booleans(),
    seed=seeds,
)
def test_sab_step_backward_matches_finite_differences(
    fd_forward, B, I, Hd, A, O, N, k_top, k_att, t, threshold_grad, block_score_grad, seed
):
    """sab_step's backward (memories included) matches central differences of its masked forward.

    "plain" differentiates sab_step.forward itself, which is the masked graph when the
    threshold carries gradient and the scorer is not blocked; "literal" covers every flag.
    """
    if fd_forward == "plain":
        threshold_grad, block_score_grad = True, False
    rng = np.random.default_rng(seed)
    config = SABConfig(
        k_top=k_top, k_att=k_att, threshold_grad=threshold_grad, block_score_grad=block_score_grad
    )
    xs = _sab_inputs(rng, B, I, Hd, A, O, N)

    def run(arrays):
        params = dict(zip(SAB_PARAMS, arrays[:8]))
        state = SabState(arrays[9], arrays[10], tuple(arrays[11:]))
        return sab_step.forward(params, arrays[8], state, config=config, t=t)

    (h_hat0, _), _ = lstm.lstm_cell_forward(xs[8], xs[9], xs[10], xs[0], xs[1])
    # The threshold is an order statistic: keep scores apart so the FD step cannot cross a tie.
    assume(
        _min_gap(
            sab.sab_scores_forward(
                h_hat0, stack_memories(tuple(xs[11:]), h_hat0), xs[2], xs[3], xs[4]
            )[0]
        )
        > 1e-2
    )

    def plain(arrays):
        state, y, _ = run(arrays)
        return (state.h, state.c, y) + state.memories

    f = plain if fd_forward == "plain" else _literal_sab_forward(xs, config, t)

    def vjp(arrays, vs):
        _, _, cache = run(arrays)
        d_state = SabState(vs[0], vs[1], tuple(vs[3:]))
        grads, dx, d_in = sab_step.backward(cache, d_state, vs[2])
        assert len(d_in.memories) == N
        return [grads[n] for n in SAB_PARAMS] + [dx, d_in.h, d_in.c] + list(d_in.memories)

    result = dot_product_test(f, vjp, xs, np.random.default_rng(seed + 1))
    assert result.ok(), f"B={B} I={I} Hd={Hd} A={A} O={O} N={N} {config} t={t}: {result}"


def test_sab_step_appends_undetached_h_on_write_steps():
    """Step t appends h' to the memories exactly when t % k_att == 0, as the very array h'."""
    rng = np.random.default_rng(5)
    arrays = _sab_inputs(rng, 2, 2, 3, 2, 2, 2)
    params = dict(zip(SAB_PARAMS, arrays[:8]))
    state = SabState(arrays[9], arrays[10], tuple(arrays[11:]))
    config = SABConfig(k_top=1, k_att=3)
    for t in range(1, 7):
        new, _, cache = sab_step.forward(params, arrays[8], state, config=config, t=t)
        assert cache.wrote == (t % 3 == 0)
        assert len(new.memories) == 2 + (t % 3 == 0)
        if t % 3 == 0:
            assert new.memories[-1] is new.h


def test_steps_are_declared_as_data():
    """STEPS lists both steps by name with their parameter names; unknown names list the choices."""
    assert set(STEPS) == {"memformer", "sab"}
    assert STEPS["memformer"].params == MEMFORMER_PARAMS and STEPS["sab"].params == SAB_PARAMS
    assert get_step("sab") is sab_step and get_step(memformer_step) is memformer_step
    with pytest.raises(ValueError, match=r"Unknown step 'lstm'. Available: memformer, sab"):
        get_step("lstm")
