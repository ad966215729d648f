"""The model-agnostic JAX MRBP (memcore.backends.jax.mrbp_model) against BPTT, in float64."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX MRBP needs jax")
import jax.numpy as jnp

from memcore.backends.jax.mrbp_model import bptt, checkpointed, mrbp
from memcore.errors import MemcoreError

pytestmark = pytest.mark.skipif(
    not jax.config.read("jax_enable_x64"), reason="needs JAX_ENABLE_X64=1 (tests/conftest.py)"
)


# ----------------------------------------------------------------------------- a user model
def init(key, D=4, Ka=3, Kb=2):
    """Two stacked memory modules: A reads the input, B reads A's output."""
    ks = jax.random.split(key, 7)
    n = lambda k, s: 0.5 * jax.random.normal(k, s, jnp.float64)
    return {"wa": n(ks[0], (D, D)), "wb": n(ks[1], (D, D)), "ua": n(ks[2], (D, D)),
            "ub": n(ks[3], (D, D)), "head": n(ks[4], (D,)), "a0": n(ks[5], (Ka, D)),
            "b0": n(ks[6], (Kb, D))}  # fmt: skip


def _read(q, m):
    return jax.nn.softmax(q @ jnp.swapaxes(m, -1, -2), -1) @ m


def step(p, m, seg):
    """(loss, {"a": (B, Ka, D), "b": (B, Kb, D)}) of one segment x (B, L, D), y (B, L)."""
    h1 = jnp.tanh(seg["x"] @ p["wa"] + _read(seg["x"], m["a"]))
    h2 = jnp.tanh(h1 @ p["wb"] + _read(h1, m["b"]))
    loss = jnp.mean((h2 @ p["head"] - seg["y"]) ** 2)
    a = jnp.tanh(m["a"] + (jnp.mean(h1, 1) @ p["ua"])[:, None, :])
    b = jnp.tanh(m["b"] @ p["ub"] + jnp.mean(h2, 1)[:, None, :])
    return loss, {"a": a, "b": b}


def memory0(p, B=2):
    """M_0 from the parameters (its gradient must reach a0 and b0)."""
    return {"a": jnp.broadcast_to(jnp.tanh(p["a0"]), (B, *p["a0"].shape)),
            "b": jnp.broadcast_to(p["b0"], (B, *p["b0"].shape))}  # fmt: skip


def data(seed, T=5, B=2, L=3, D=4):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"x": jax.random.normal(k1, (T, B, L, D), jnp.float64),
            "y": jax.random.normal(k2, (T, B, L), jnp.float64)}  # fmt: skip


PARAMS = init(jax.random.PRNGKey(0))
SEGS = data(1)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _assert_same(got, want, rtol=1e-10):
    (l1, g1, m1), (l2, g2, m2) = got, want
    assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(PARAMS)
    np.testing.assert_allclose(float(l1), float(l2), rtol=rtol)
    np.testing.assert_allclose(_flat(g1), _flat(g2), rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(_flat(m1), _flat(m2), rtol=rtol, atol=1e-14)


# ----------------------------------------------------------------------------- gradients
# (options, memory0 given as a callable?); later tests reuse these compiled programs.
CASES = [
    ({}, True),
    ({"truncate_every": 2}, False),
    ({"horizon": 2}, True),
    ({"horizon": 3, "truncate_every": 3}, False),
    ({"loss_scale": 0.25, "truncate_every": 4, "offload": "host"}, True),
]


def _id(case):
    opts, fn = case
    return ",".join([f"{k}={v}" for k, v in opts.items()] + ["m0-fn" if fn else "m0-tree"])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_mrbp_equals_bptt(case):
    """MRBP's loss, every gradient and M_T equal BPTT's (rtol 1e-10) for each option."""
    opts, callable_m0 = case
    m0 = memory0 if callable_m0 else memory0(PARAMS)
    got = mrbp(step, PARAMS, m0, SEGS, **opts)
    base = {k: v for k, v in opts.items() if k != "offload"}  # CPU: both spaces are host
    _assert_same(got, bptt(step, PARAMS, m0, SEGS, **base))
    if callable_m0:  # the gradient reached memory0's parameters
        assert np.abs(np.asarray(got[1]["a0"])).sum() > 0


def test_checkpointed_equals_bptt():
    """Per-segment jax.checkpoint gives BPTT's gradients (with a cut)."""
    m0 = memory0(PARAMS)
    _assert_same(checkpointed(step, PARAMS, m0, SEGS, truncate_every=2),
                 bptt(step, PARAMS, m0, SEGS, truncate_every=2))  # fmt: skip


def test_horizon_definition():
    """horizon=1 is truncate_every=1; horizon=2 differs from both it and no horizon."""
    h1 = mrbp(step, PARAMS, memory0, SEGS, horizon=1)
    _assert_same(h1, bptt(step, PARAMS, memory0, SEGS, truncate_every=1))
    full = bptt(step, PARAMS, memory0, SEGS)
    h2 = _flat(bptt(step, PARAMS, memory0, SEGS, horizon=2)[1])
    assert np.abs(h2 - _flat(full[1])).max() > 1e-3 and np.abs(h2 - _flat(h1[1])).max() > 1e-3


def test_loss_scale_scales_loss_and_grads():
    """loss_scale=s multiplies the loss and every gradient by s."""
    one = mrbp(step, PARAMS, memory0, SEGS)
    quarter = mrbp(step, PARAMS, memory0, SEGS, loss_scale=0.25)
    np.testing.assert_allclose(float(quarter[0]), 0.25 * float(one[0]), rtol=1e-12)
    np.testing.assert_allclose(_flat(quarter[1]), 0.25 * _flat(one[1]), rtol=1e-12, atol=1e-15)


def test_offload_lowers_to_pinned_host_on_cuda():
    """Lowered for CUDA, offload='host' places the stored memories in pinned host memory."""
    fn = lambda p, s, off: mrbp(step, p, memory0, s, offload=off)
    try:
        run = jax.jit(fn, static_argnums=2)
        texts = [run.trace(PARAMS, SEGS, off).lower(lowering_platforms=("cuda",)).as_text()
                 for off in (None, "host")]  # fmt: skip
    except Exception as e:  # noqa: BLE001 - an older jax or jaxlib without cross-lowering
        pytest.skip(f"needs cross-platform lowering for CUDA: {type(e).__name__}")
    plain, host = texts
    assert '_xla_buffer_placement = "pinned_host"' in host
    assert "pinned_host" not in plain


# ----------------------------------------------------------------------------- transformations
def test_under_jit_equals_eager_and_compiles_once():
    """Under jax.jit (step static via partial) MRBP equals eager; new segments reuse the trace."""
    traces = []

    def counted(p, m, seg):
        traces.append(1)  # runs only while tracing
        return step(p, m, seg)

    run = jax.jit(functools.partial(mrbp, counted, truncate_every=2))
    m0 = memory0(PARAMS)
    got = run(PARAMS, m0, SEGS)
    n = len(traces)
    _assert_same(got, mrbp(step, PARAMS, m0, SEGS, truncate_every=2))
    other = run(PARAMS, m0, data(2))
    assert len(traces) == n and n > 0
    _assert_same(other, bptt(step, PARAMS, m0, data(2), truncate_every=2))


def test_eager_calls_reuse_the_compiled_program():
    """Without an outer jit, the same step object is traced once for any segment contents."""
    traces = []

    def counted(p, m, seg):
        traces.append(1)
        return step(p, m, seg)

    mrbp(counted, PARAMS, memory0, SEGS)
    n = len(traces)
    mrbp(counted, PARAMS, memory0, data(3))
    mrbp(counted, PARAMS, memory0, data(4), loss_scale=0.5)  # the scale is not static
    assert len(traces) == n and n > 0


def test_vmap_over_rollouts():
    """jax.vmap over independent rollouts gives each rollout's own loss, grads and M_T."""
    m0s = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), memory0(PARAMS))
    segs = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), SEGS, data(5))
    batched = jax.vmap(lambda m, s: mrbp(step, PARAMS, m, s, truncate_every=2))(m0s, segs)
    for i in range(2):
        pick = lambda t: jax.tree_util.tree_map(lambda x: x[i], t)  # noqa: B023 - used in-loop
        _assert_same(pick(batched), bptt(step, PARAMS, pick(m0s), pick(segs), truncate_every=2))


# ----------------------------------------------------------------------------- memory
def test_memory_grows_by_one_memory_per_segment():
    """Compiled temp bytes: MRBP adds at most 2 |M| per segment, and at T=16 needs under a
    fifth of BPTT's (which keeps every segment's activations)."""
    params = init(jax.random.PRNGKey(0), D=8)
    m_bytes = 2 * (3 + 2) * 8 * 8  # B (Ka + Kb) D float64

    def temp(fn, T):
        segs = data(1, T=T, L=64, D=8)
        run = jax.jit(lambda p, s: fn(step, p, memory0, s))
        return run.lower(params, segs).compile().memory_analysis().temp_size_in_bytes

    try:
        small, large, full = temp(mrbp, 4), temp(mrbp, 16), temp(bptt, 16)
    except AttributeError:
        pytest.skip("needs compiled memory_analysis() on this jaxlib")
    assert 0 < (large - small) / 12 <= 2 * m_bytes
    assert 5 * large < full


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"truncate_every": 0}, "`truncate_every` must be None or an integer >= 1"),
        ({"horizon": True}, "`horizon` must be None or an integer >= 1"),
        ({"offload": "disk"}, "`offload` must be None or 'host'. Received: offload='disk'"),
        ({"loss_scale": jnp.ones(2)}, "`loss_scale` must be a real scalar"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    """Each bad option names itself, the expectation and what it received."""
    with pytest.raises(MemcoreError, match=match.replace("(", r"\(").replace(")", r"\)")):
        mrbp(step, PARAMS, memory0, SEGS, **kwargs)


def test_bad_inputs_are_refused():
    """Mismatched T, integer params, a wrong next_memory and unsupported options are refused."""
    segs = {"x": SEGS["x"], "y": SEGS["y"][:3]}
    with pytest.raises(MemcoreError, match="`segments` leaves must share a leading T axis"):
        mrbp(step, PARAMS, memory0, segs)
    with pytest.raises(MemcoreError, match=r"`params` leaves must be floating.*\['n'\]"):
        mrbp(step, {**PARAMS, "n": jnp.arange(3)}, memory0, SEGS)
    bad = lambda p, m, s: (step(p, m, s)[0], {"a": m["a"][:, :1], "b": m["b"]})
    with pytest.raises(MemcoreError, match=r"next_memory\['a'\] must have shape \(2, 3, 4\)"):
        mrbp(bad, PARAMS, memory0, SEGS)
    with pytest.raises(MemcoreError, match="`offload` is an option of mrbp only"):
        bptt(step, PARAMS, memory0, SEGS, offload="host")
    with pytest.raises(MemcoreError, match="`horizon` < T is supported by mrbp and bptt"):
        checkpointed(step, PARAMS, memory0, SEGS, horizon=2)
    with pytest.raises(MemcoreError, match="`step` must be a callable"):
        mrbp("step", PARAMS, memory0, SEGS)
