"""Memformer routing: MRBP equals BPTT, truncation, chained rollouts, and bad input.

Every comparison is float64 with relative error < 1e-10 on the loss, every parameter
gradient, dM_0 and M_T; BPTT itself is checked against finite differences of the loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import memcore.reference.steps as steps_module
from memcore.backends.numpy import NumpyBackend
from memcore.config import MemoryConfig
from memcore.conformance.strategies import seeds
from memcore.errors import MemcoreError
from memcore.gradcheck import dot_product_test
from memcore.reference import routing
from memcore.reference.routing.samples import RoutingSample, memformer_sample
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult

RTOL = 1e-10


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(
        np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    )


def _assert_same(got: RoutingResult, want: RoutingResult, what: str) -> None:
    assert _rel(got.loss, want.loss) < RTOL, f"{what}: loss {got.loss} != {want.loss}"
    assert set(got.grads) == set(want.grads), what
    for name in want.grads:
        assert _rel(got.grads[name], want.grads[name]) < RTOL, f"{what}: grads[{name}]"
    assert _rel(got.d_state0, want.d_state0) < RTOL, f"{what}: d_state0"
    assert _rel(got.final_state, want.final_state) < RTOL, f"{what}: final_state"


def _call(driver, s: RoutingSample, **over):
    kw = {"config": s.config, "loss": s.loss, **s.extra, **over}
    if driver == "bptt":
        return routing.bptt("memformer", s.params, s.xs, s.state0, s.targets, **kw)
    return routing.mrbp(s.params, s.xs, s.state0, s.targets, **kw)


@st.composite
def memformer_samples(draw, *, max_steps: int = 12) -> RoutingSample:
    H, dh = draw(st.integers(1, 2), label="H"), draw(st.integers(1, 2), label="dh")
    return memformer_sample(
        np.random.default_rng(draw(seeds, label="seed")),
        T=draw(st.integers(1, max_steps), label="T"),
        B=draw(st.integers(1, 2), label="B"),
        L=draw(st.integers(1, 3), label="L"),
        K=draw(st.integers(1, 3), label="K"),
        D=H * dh,
        H=H,
        tau=draw(st.sampled_from([0.25, 0.5, 1.0]), label="tau"),
        kind=draw(st.sampled_from(["mse", "xent"]), label="kind"),
        C=draw(st.integers(1, 3), label="C"),
        resets=draw(st.booleans(), label="resets"),
        token_mask=draw(st.booleans(), label="token_mask"),
        zero_weight_prob=draw(st.sampled_from([0.0, 0.3]), label="zero_weight_prob"),
    )


@given(s=memformer_samples())
def test_mrbp_equals_bptt(s):
    """mrbp gives BPTT's loss, every parameter gradient, dM_0 and M_T (float64, < 1e-10)."""
    _assert_same(_call("mrbp", s), _call("bptt", s), f"T={s.xs.shape[0]} {s.config} {s.loss}")


@given(s=memformer_samples(), k=st.integers(1, 5))
def test_mrbp_truncate_every_equals_bptt_truncate_every(s, k):
    """mrbp(truncate_every=k) equals bptt(truncate_every=k)."""
    _assert_same(_call("mrbp", s, truncate_every=k), _call("bptt", s, truncate_every=k), f"k={k}")


def _rollout(s: RoutingSample, lo: int, hi: int, m0) -> RoutingSample:
    weights = None if s.loss.weights is None else s.loss.weights[lo:hi]
    extra = {k: None if v is None else v[lo:hi] for k, v in s.extra.items()}
    return RoutingSample(
        s.params, s.xs[lo:hi], m0, s.targets[lo:hi], s.config, Loss(s.loss.kind, weights), extra
    )


def _sum(results: list[RoutingResult]) -> dict:
    return {n: sum(r.grads[n] for r in results) for n in results[0].grads}


@given(s=memformer_samples(), k=st.integers(1, 4))
def test_truncate_every_is_bptt_per_rollout_with_memory_carried(s, k):
    """bptt(truncate_every=k) is the sum of separate BPTTs over k-step rollouts, M carried across."""
    steps = s.xs.shape[0]
    parts, memory = [], s.state0
    for lo in range(0, steps, k):
        part = _call("bptt", _rollout(s, lo, min(lo + k, steps), memory))
        parts.append(part)
        memory = part.final_state
    whole = _call("bptt", s, truncate_every=k)
    assert _rel(whole.loss, sum(p.loss for p in parts)) < RTOL
    for name, g in _sum(parts).items():
        assert _rel(whole.grads[name], g) < RTOL, name
    assert _rel(whole.d_state0, parts[0].d_state0) < RTOL
    assert _rel(whole.final_state, parts[-1].final_state) < RTOL


@given(s=memformer_samples(), cut=st.integers(1, 11))
def test_chained_mrbp_rollouts_match_truncated_bptt(s, cut):
    """Two mrbp rollouts chained through M_T (dM_0 not passed on) equal per-rollout BPTT and
    one long BPTT truncated at the rollout boundary."""
    steps = s.xs.shape[0]
    cut = min(cut, steps - 1)
    if cut < 1:  # one step: nothing to chain; the rollout is the whole sequence
        _assert_same(_call("mrbp", s), _call("bptt", s), "T=1")
        return
    first = _call("mrbp", _rollout(s, 0, cut, s.state0))
    second = _call("mrbp", _rollout(s, cut, steps, first.final_state))
    separate = [_call("bptt", _rollout(s, 0, cut, s.state0))]
    separate.append(_call("bptt", _rollout(s, cut, steps, separate[0].final_state)))
    _assert_same(first, separate[0], "first rollout")
    _assert_same(second, separate[1], "second rollout")
    # One long BPTT cut at the boundary: truncate_every = cut cuts only there when the
    # second rollout is not longer than the first.
    if steps - cut <= cut:
        whole = _call("bptt", s, truncate_every=cut)
        assert _rel(whole.loss, first.loss + second.loss) < RTOL
        for name, g in _sum([first, second]).items():
            assert _rel(whole.grads[name], g) < RTOL, name
        assert _rel(whole.d_state0, first.d_state0) < RTOL
        assert _rel(whole.final_state, second.final_state) < RTOL


def _independent_loss(s: RoutingSample, params: dict, m0: np.ndarray) -> float:
    """L recomputed from memformer_unroll's outputs with NumPy's own mse / xent."""
    ys, _ = routing.memformer_unroll(params, s.xs, m0, config=s.config, **s.extra)
    weights = s.loss.weights or (1.0,) * ys.shape[0]
    total = 0.0
    for w, y, target in zip(weights, ys, s.targets):
        if s.loss.kind == "mse":
            total += w * np.mean((y - target) ** 2)
        else:
            logits = y @ params[HEAD_PARAM]
            logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(
                -1
            )
            total += w * np.mean(logz - np.take_along_axis(logits, target[..., None], -1)[..., 0])
    return total


@given(s=memformer_samples(max_steps=4), seed=seeds)
def test_bptt_matches_finite_differences(s, seed):
    """BPTT's parameter and dM_0 gradients match central differences of an independently computed L."""
    names = list(s.params)

    def f(arrays):
        return np.array(_independent_loss(s, dict(zip(names, arrays[:-1])), arrays[-1]))

    def vjp(arrays, vs):
        r = routing.bptt(
            "memformer",
            dict(zip(names, arrays[:-1])),
            s.xs,
            arrays[-1],
            s.targets,
            config=s.config,
            loss=s.loss,
            **s.extra,
        )
        assert abs(r.loss - float(f(arrays))) <= 1e-12 * max(1.0, abs(r.loss))
        return [r.grads[n] * vs[0] for n in names] + [r.d_state0 * vs[0]]

    result = dot_product_test(
        f, vjp, [s.params[n] for n in names] + [s.state0], np.random.default_rng(seed)
    )
    assert result.ok(), result


@pytest.mark.parametrize("k", [None, 1, 3])
def test_mrbp_skips_the_write_vjp_where_no_memory_gradient_arrives(monkeypatch, k):
    """The last step (and the step before each truncation cut) runs no memory_write backward."""
    calls = []
    real = steps_module.memory_write_backward
    monkeypatch.setattr(
        steps_module, "memory_write_backward", lambda *a: calls.append(1) or real(*a)
    )
    steps = 7
    s = memformer_sample(np.random.default_rng(0), T=steps)
    routing.mrbp(
        s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss, truncate_every=k
    )
    cuts = 0 if k is None else len([t for t in range(1, steps) if t % k == 0])
    assert len(calls) == steps - 1 - cuts


def test_drivers_do_not_mutate_inputs():
    """bptt and mrbp leave params, xs, M_0, targets, resets and token_mask unchanged."""
    s = memformer_sample(np.random.default_rng(1), T=5, kind="xent", resets=True, token_mask=True)
    before = copy.deepcopy(s)
    for driver in ("bptt", "mrbp"):
        _call(driver, s, truncate_every=2)
    for name in s.params:
        np.testing.assert_array_equal(s.params[name], before.params[name])
    for a, b in [(s.xs, before.xs), (s.state0, before.state0), (s.targets, before.targets)]:
        np.testing.assert_array_equal(a, b)
    for key in s.extra:
        np.testing.assert_array_equal(s.extra[key], before.extra[key])


def test_numpy_backend_serves_the_reference_drivers():
    """NumpyBackend.bptt / mrbp return exactly the reference's results."""
    s = memformer_sample(np.random.default_rng(2), T=3, resets=True)
    backend = NumpyBackend()
    kw = {"config": s.config, "loss": s.loss, **s.extra}
    _assert_same(backend.mrbp(s.params, s.xs, s.state0, s.targets, **kw), _call("mrbp", s), "mrbp")
    _assert_same(
        backend.bptt("memformer", s.params, s.xs, s.state0, s.targets, **kw),
        _call("bptt", s),
        "bptt",
    )


def _bad_cases():
    s = memformer_sample(
        np.random.default_rng(3), T=3, B=2, L=2, K=3, D=4, H=2, resets=True, token_mask=True
    )
    x = memformer_sample(np.random.default_rng(3), T=3, B=2, L=2, K=3, D=4, H=2, kind="xent", C=3)
    no_head = {k: v for k, v in x.params.items() if k != HEAD_PARAM}
    return [
        (
            "targets T",
            s,
            {"targets": s.targets[:2]},
            r"`targets` must have shape \(T, B, L, D\) = \(3, 2, 2, 4\)",
        ),
        ("xs T = 0", s, {"xs": s.xs[:0], "targets": s.targets[:0]}, r"`xs` must have T >= 1"),
        (
            "state0 shape",
            s,
            {"state0": s.state0[:, :2]},
            r"`state0` must have shape \(B, K, D\) = \(2, 3, 4\)",
        ),
        ("resets T", s, {"resets": s.extra["resets"][:2]}, r"`resets` must have shape \(T, B\)"),
        (
            "token_mask dtype",
            s,
            {"token_mask": s.extra["token_mask"].astype(float)},
            r"`token_mask` must have dtype bool",
        ),
        (
            "weights length",
            s,
            {"loss": Loss("mse", (1.0, 2.0))},
            r"`loss.weights` must have one weight per step",
        ),
        (
            "truncate_every 0",
            s,
            {"truncate_every": 0},
            r"`truncate_every` must be None or an integer >= 1",
        ),
        (
            "no tokens",
            s,
            {"xs": s.xs[:, :, :0], "targets": s.targets[:, :, :0]},
            r"`xs` must have B >= 1, L >= 1",
        ),
        ("xs width", s, {"xs": s.xs[..., :3]}, r"`xs` must have shape \(T, B, L, D\)"),
        ("config type", s, {"config": "memformer"}, r"`config` must be a memcore.MemoryConfig"),
        ("xs NaN", s, {"xs": np.where(s.xs > 0.5, np.nan, s.xs)}, r"`xs` must be finite"),
        (
            "param dtype",
            s,
            {"params": {**s.params, "read_wq": s.params["read_wq"].astype(np.float32)}},
            r"`params\['read_wq'\]` must have the float dtype of `xs` \(float64\)",
        ),
        ("missing head", x, {"params": no_head}, r"`params` must contain .*head_w"),
        (
            "head for mse",
            s,
            {"params": {**s.params, HEAD_PARAM: x.params[HEAD_PARAM]}},
            r"head_w is used by loss kind 'xent' only",
        ),
        (
            "class id range",
            x,
            {"targets": x.targets + 3},
            r"`targets` must hold class ids in \[0, C\) = \[0, 3\)",
        ),
        (
            "float class ids",
            x,
            {"targets": x.targets.astype(float)},
            r"`targets` must hold integer class ids",
        ),
        (
            "config mismatch",
            s,
            {"config": MemoryConfig(slots=4, dim=4, heads=2)},
            r"`state0` must have shape",
        ),
    ]


@pytest.mark.parametrize("driver", ["bptt", "mrbp"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_memcore_error(driver, case):
    """Every malformed call raises MemcoreError naming the argument and what it must be."""
    _, s, over, pattern = case
    if driver == "mrbp":  # the initial memory is `M0` in mrbp's signature, `state0` in bptt's
        pattern = pattern.replace("`state0`", "`M0`")
    call = {
        "params": s.params,
        "xs": s.xs,
        "state0": s.state0,
        "targets": s.targets,
        "config": s.config,
        "loss": s.loss,
        **s.extra,
        **over,
    }
    with pytest.raises(MemcoreError, match=pattern):
        if driver == "bptt":
            routing.bptt(
                "memformer",
                call.pop("params"),
                call.pop("xs"),
                call.pop("state0"),
                call.pop("targets"),
                **call,
            )
        else:
            routing.mrbp(
                call.pop("params"), call.pop("xs"), call.pop("state0"), call.pop("targets"), **call
            )


def test_bptt_rejects_unknown_step():
    """bptt with an unknown step name lists the available steps."""
    s = memformer_sample(np.random.default_rng(4), T=2)
    with pytest.raises(MemcoreError, match=r"Unknown step 'gru'. Available: memformer, sab"):
        routing.bptt("gru", s.params, s.xs, s.state0, s.targets, config=s.config)
