"""SAB routing: sparse replay equals sab_bptt, sab_bptt equals BPTT and finite differences
without truncation, exact zeros for never-weighted memories, chunk skipping, bad input."""

from __future__ import annotations

import copy

import attrs
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from memcore.backends.numpy import NumpyBackend
from memcore.config import SABConfig
from memcore.conformance.strategies import seeds
from memcore.errors import MemcoreError
from memcore.gradcheck import dot_product_test
from memcore.reference import routing
from memcore.reference.routing.sab import chunk_bounds, initial_state
from memcore.reference.routing.samples import RoutingSample, sab_sample
from memcore.reference.steps import sab_step
from memcore.routing_types import HEAD_PARAM, Loss, RoutingResult

RTOL = 1e-10


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(
        np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    )


def _assert_same(got: RoutingResult, want: RoutingResult, what: str, final: bool = True) -> None:
    assert _rel(got.loss, want.loss) < RTOL, f"{what}: loss {got.loss} != {want.loss}"
    assert set(got.grads) == set(want.grads), what
    for name in want.grads:
        assert _rel(got.grads[name], want.grads[name]) < RTOL, f"{what}: grads[{name}]"
    for i in range(2):
        assert _rel(got.d_state0[i], want.d_state0[i]) < RTOL, f"{what}: d_state0[{i}]"
        if final:
            assert _rel(got.final_state[i], want.final_state[i]) < RTOL, f"{what}: final_state[{i}]"


def _run(driver, s: RoutingSample, **over) -> RoutingResult:
    kw = {"config": s.config, "loss": s.loss, **over}
    if driver == "bptt":
        return routing.bptt("sab", s.params, s.xs, s.state0, s.targets, **kw)
    return getattr(routing, driver)(s.params, s.xs, s.state0, s.targets, **kw)


@st.composite
def sab_samples(
    draw, *, min_steps: int = 1, max_steps: int = 12, zero_weight_probs=(0.0, 0.5), **fixed
) -> RoutingSample:
    flags = {
        n: draw(st.booleans(), label=n)
        for n in ("threshold_grad", "block_score_grad", "include_h0_memory")
    }
    config = SABConfig(
        k_top=draw(st.integers(1, 4), label="k_top"),
        k_att=draw(st.integers(1, 4), label="k_att"),
        k_trunc=draw(st.integers(1, 5), label="k_trunc"),
        **{**flags, **fixed},
    )
    return sab_sample(
        np.random.default_rng(draw(seeds, label="seed")),
        T=draw(st.integers(min_steps, max_steps), label="T"),
        B=draw(st.integers(1, 2), label="B"),
        I=draw(st.integers(1, 2), label="I"),
        Hd=draw(st.integers(1, 3), label="Hd"),
        A=draw(st.integers(1, 3), label="A"),
        O=draw(st.integers(1, 2), label="O"),
        config=config,
        kind=draw(st.sampled_from(["mse", "xent"]), label="kind"),
        C=draw(st.integers(1, 3), label="C"),
        zero_weight_prob=draw(st.sampled_from(zero_weight_probs), label="zero_weight_prob"),
    )


@given(s=sab_samples())
def test_sparse_replay_equals_sab_bptt(s):
    """sab_sparse_replay gives sab_bptt's loss, gradients, (dh0, dc0) and (h_T, c_T) (< 1e-10)."""
    got = _run("sab_sparse_replay", s)
    _assert_same(got, _run("sab_bptt", s), f"T={s.xs.shape[0]} {s.config} {s.loss}")
    assert len(set(got.replayed_chunks)) == len(got.replayed_chunks)
    assert list(got.replayed_chunks) == sorted(got.replayed_chunks, reverse=True)


@given(s=sab_samples(), extra=st.integers(0, 3))
def test_sab_bptt_without_truncation_equals_full_bptt(s, extra):
    """With k_trunc >= T, sab_bptt (and sparse replay) equal bptt('sab') for every flag setting."""
    s = attrs.evolve(s, config=attrs.evolve(s.config, k_trunc=s.xs.shape[0] + extra))
    full = _run("bptt", s)
    _assert_same(_run("sab_bptt", s), full, "sab_bptt")
    _assert_same(_run("sab_sparse_replay", s), full, "sab_sparse_replay")


def _min_score_gap(s: RoutingSample) -> float:
    """Smallest gap between two scores of one read over the rollout (inf when no read has two)."""
    state, gap = initial_state(s.state0, s.config), np.inf
    for t in range(1, s.xs.shape[0] + 1):
        state, _, cache = sab_step.forward(s.params, s.xs[t - 1], state, config=s.config, t=t)
        scores = cache.retrieve.scores.t @ cache.retrieve.scores.w3
        if scores.shape[-1] >= 2:
            gap = min(gap, float(np.diff(np.sort(scores, axis=-1), axis=-1).min()))
    return gap


def _step_loss(s: RoutingSample, params: dict, y: np.ndarray, target: np.ndarray) -> float:
    if s.loss.kind == "mse":
        return float(np.mean((y - target) ** 2))
    logits = y @ params[HEAD_PARAM]
    top = logits.max(-1)
    logz = np.log(np.sum(np.exp(logits - top[:, None]), -1)) + top
    return float(np.mean(logz - logits[np.arange(len(target)), target]))


def _independent_loss(s: RoutingSample, params: dict, state0: tuple) -> float:
    """L from sab_unroll's outputs with NumPy's own mse / xent."""
    ys = routing.sab_unroll(params, s.xs, state0, config=s.config).ys
    weights = s.loss.weights or (1.0,) * ys.shape[0]
    return sum(w * _step_loss(s, params, y, target) for w, y, target in zip(weights, ys, s.targets))


def _fd_check(s: RoutingSample, driver, loss_fn, seed: int) -> None:
    """Dot-product test of a driver's parameter and (dh0, dc0) gradients against loss_fn."""
    names = list(s.params)

    def f(arrays):
        return np.array(loss_fn(dict(zip(names, arrays[:-2])), (arrays[-2], arrays[-1])))

    def vjp(arrays, vs):
        r = driver(
            dict(zip(names, arrays[:-2])),
            s.xs,
            (arrays[-2], arrays[-1]),
            s.targets,
            config=s.config,
            loss=s.loss,
        )
        assert abs(r.loss - float(f(arrays))) <= 1e-12 * max(1.0, abs(r.loss))
        return [r.grads[n] * vs[0] for n in names] + [r.d_state0[0] * vs[0], r.d_state0[1] * vs[0]]

    arrays = [s.params[n] for n in names] + list(s.state0)
    result = dot_product_test(f, vjp, arrays, np.random.default_rng(seed))
    assert result.ok(), f"{s.config} T={s.xs.shape[0]}: {result}"


@given(s=sab_samples(max_steps=6, threshold_grad=True, block_score_grad=False), seed=seeds)
def test_sab_bptt_without_truncation_matches_finite_differences(s, seed):
    """With k_trunc >= T and threshold_grad the forward is smooth: sab_bptt matches central
    differences of L (computed independently) in every parameter, h0 and c0."""
    s = attrs.evolve(s, config=attrs.evolve(s.config, k_trunc=s.xs.shape[0]))
    # The threshold is an order statistic: a near-tie within the FD step would switch entries.
    assume(_min_score_gap(s) > 1e-2)
    _fd_check(
        s, routing.sab_bptt, lambda params, state0: _independent_loss(s, params, state0), seed
    )


@given(s=sab_samples(max_steps=8, threshold_grad=True, block_score_grad=False), seed=seeds)
def test_truncated_sab_bptt_matches_finite_differences_of_the_cut_graph(s, seed):
    """With chunk truncation, sab_bptt matches central differences of the forward in which
    (h, c) entering every chunk start is held at its unperturbed value, while memories
    (and so the gradient through them, across chunks) stay live."""
    assume(_min_score_gap(s) > 1e-2)
    held = {}  # (h, c) entering each cut step, from the unperturbed run
    state = initial_state(s.state0, s.config)
    for t in range(1, s.xs.shape[0] + 1):
        held[t] = (state.h, state.c)
        state = sab_step.forward(s.params, s.xs[t - 1], state, config=s.config, t=t)[0]

    def cut_loss(params, state0):
        state, total = initial_state(state0, s.config), 0.0
        weights = s.loss.weights or (1.0,) * s.xs.shape[0]
        for t in range(1, s.xs.shape[0] + 1):
            if t > 1 and (t - 1) % s.config.k_trunc == 0:
                state = state._replace(h=held[t][0], c=held[t][1])
            state, y, _ = sab_step.forward(params, s.xs[t - 1], state, config=s.config, t=t)
            total += weights[t - 1] * _step_loss(s, params, y, s.targets[t - 1])
        return total

    _fd_check(s, routing.sab_bptt, cut_loss, seed)


def _never_weighted(s: RoutingSample) -> list[np.ndarray]:
    """Per memory j, (B,) flags: rows where memory j got weight 0 in every read."""
    unroll = routing.sab_unroll(s.params, s.xs, s.state0, config=s.config)
    flags = []
    for j in range(unroll.memories.shape[1]):
        reads = [w[:, j] for w in unroll.weights if w.shape[1] > j]
        flags.append(
            np.all(np.stack(reads) == 0, axis=0) if reads else np.ones(s.xs.shape[1], bool)
        )
    return flags


@pytest.mark.parametrize(
    "flags",
    [{"threshold_grad": False}, {"threshold_grad": True, "block_score_grad": True}],
    ids=["threshold-stopped", "scorer-blocked"],
)
@given(data=st.data())
def test_never_weighted_memories_get_exactly_zero_gradient(flags, data):
    """A memory whose weight is 0 in every read gets exactly zero gradient (per batch row)."""
    s = data.draw(sab_samples(**flags), label="sample")
    grads = routing.sab_memory_grads(
        s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss
    )
    for j, rows in enumerate(_never_weighted(s)):
        assert np.all(grads[j][rows] == 0.0), f"memory {j} rows {rows}: {grads[j][rows]}"


def test_never_weighted_memories_exist_and_get_zero_gradient():
    """With k_top = 1 most memories are never weighted; each of them gets exactly zero gradient
    while the weighted ones do get gradient."""
    s = sab_sample(
        np.random.default_rng(7), T=12, B=2, config=SABConfig(k_top=1, k_att=1, k_trunc=4)
    )
    grads = routing.sab_memory_grads(
        s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss
    )
    flags = _never_weighted(s)
    assert sum(int(f.sum()) for f in flags) >= 4
    assert any(np.any(g[~f] != 0) for g, f in zip(grads, flags))
    for j, rows in enumerate(flags):
        assert np.all(grads[j][rows] == 0.0)


def _expected_replayed(s: RoutingSample) -> set[int]:
    """Chunks that receive gradient under sab_bptt: a non-zero loss weight, or a memory with
    non-zero gradient written in the chunk."""
    grads = routing.sab_memory_grads(
        s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss
    )
    weights = s.loss.weights or (1.0,) * s.xs.shape[0]
    first = int(
        s.config.include_h0_memory
    )  # memory j >= first is written at step (j - first + 1) k_att
    live = set()
    for m, (start, stop) in enumerate(chunk_bounds(s.xs.shape[0], s.config.k_trunc)):
        written = [
            j for j in range(first, len(grads)) if start <= (j - first + 1) * s.config.k_att < stop
        ]
        if any(weights[t - 1] != 0 for t in range(start, stop)) or any(
            np.any(grads[j] != 0) for j in written
        ):
            live.add(m)
    return live


@given(s=sab_samples(zero_weight_probs=(0.6, 0.9)))
def test_replays_exactly_the_chunks_that_receive_gradient(s):
    """Replayed chunks are exactly those with a weighted loss term or a written memory with
    gradient (per sab_bptt); the skipped ones contribute nothing (results stay equal)."""
    got = _run("sab_sparse_replay", s)
    assert set(got.replayed_chunks) == _expected_replayed(s)
    _assert_same(got, _run("sab_bptt", s), "with skipped chunks")


@given(s=sab_samples(min_steps=2, zero_weight_probs=(0.0,)), draw_last=st.integers(0, 10))
def test_chunks_after_the_last_loss_term_are_skipped(s, draw_last):
    """With zero weights after step `last`, later chunks are skipped and the gradient equals
    sab_bptt of the prefix xs[:last]: those chunks really received no gradient."""
    steps = s.xs.shape[0]
    last = 1 + draw_last % (steps - 1)  # 1 <= last < T
    s = attrs.evolve(
        s, loss=Loss(s.loss.kind, tuple(1.0 if t < last else 0.0 for t in range(steps)))
    )
    got = _run("sab_sparse_replay", s)
    assert max(got.replayed_chunks) == (last - 1) // s.config.k_trunc
    prefix = RoutingSample(
        s.params, s.xs[:last], s.state0, s.targets[:last], s.config, Loss(s.loss.kind)
    )
    _assert_same(got, _run("sab_bptt", prefix), f"last={last}", final=False)


def test_zero_weight_chunk_is_replayed_when_its_memory_gets_gradient():
    """A chunk without loss terms is still replayed when a later read sends its memory gradient."""
    config = SABConfig(k_top=3, k_att=2, k_trunc=2)
    s = sab_sample(np.random.default_rng(11), T=8, config=config)
    s = attrs.evolve(s, loss=Loss("mse", (0.0,) * 7 + (1.0,)))
    got = _run("sab_sparse_replay", s)
    assert 3 in got.replayed_chunks and len(got.replayed_chunks) >= 2
    _assert_same(got, _run("sab_bptt", s), "memory-only chunks")


def test_drivers_do_not_mutate_inputs_and_backend_delegates():
    """The SAB drivers leave their inputs unchanged; NumpyBackend returns the reference's results."""
    s = sab_sample(
        np.random.default_rng(2),
        T=7,
        kind="xent",
        config=SABConfig(k_top=2, k_att=2, k_trunc=3, include_h0_memory=True),
    )
    before = copy.deepcopy(s)
    backend = NumpyBackend()
    for driver in ("sab_bptt", "sab_sparse_replay"):
        mine = getattr(backend, driver)(
            s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss
        )
        _assert_same(mine, _run(driver, s), driver)
    _assert_same(
        backend.bptt("sab", s.params, s.xs, s.state0, s.targets, config=s.config, loss=s.loss),
        _run("bptt", s),
        "bptt",
    )
    for name in s.params:
        np.testing.assert_array_equal(s.params[name], before.params[name])
    for a, b in [
        (s.xs, before.xs),
        (s.targets, before.targets),
        (s.state0[0], before.state0[0]),
        (s.state0[1], before.state0[1]),
    ]:
        np.testing.assert_array_equal(a, b)


def _unchecked(config: SABConfig, **changes) -> SABConfig:
    """A config whose fields bypassed SABConfig's validators (as a careless caller could build)."""
    bad = copy.copy(config)
    for k, v in changes.items():
        object.__setattr__(bad, k, v)
    return bad


def _bad_cases():
    s = sab_sample(np.random.default_rng(3), T=4, B=2, I=2, Hd=3, A=2, O=2)
    x = sab_sample(np.random.default_rng(3), T=4, B=2, I=2, Hd=3, A=2, O=2, kind="xent", C=3)
    h0, c0 = s.state0
    w2 = {**s.params, "w2": s.params["w2"][:, :1]}
    # fmt: off
    return [
        ("targets T", s, {"targets": s.targets[:3]}, r"`targets` must have shape \(T, B, O\) = \(4, 2, 2\)"),
        ("xent targets T", x, {"targets": x.targets[:3]}, r"`targets` must have shape \(T, B\) = \(4, 2\)"),
        ("T = 0", s, {"xs": s.xs[:0], "targets": s.targets[:0]}, r"`xs` must have T >= 1"),
        ("h0 shape", s, {"state0": (h0[:, :2], c0)}, r"`state0\[0\]` must have shape \(B, Hd\) = \(2, 3\)"),
        ("c0 shape", s, {"state0": (h0, c0[:, :2])}, r"`state0\[1\]` must have shape \(B, Hd\) = \(2, 3\)"),
        ("h0 batch", s, {"state0": (h0[:1], c0)}, r"Received: state0\[0\].shape=\(1, 3\)"),
        ("state0 not a pair", s, {"state0": h0}, r"`state0` must be a pair \(h0, c0\)"),
        ("empty batch", s, {"xs": s.xs[:, :0], "targets": s.targets[:, :0]}, r"`xs` must have B >= 1"),
        ("xs rank", s, {"xs": s.xs[0]}, r"`xs` must have shape \(T, B, I\)"),
        ("k_att 0", s, {"config": _unchecked(s.config, k_att=0)}, r"`config.k_att` must be an integer >= 1"),
        ("k_trunc 0", s, {"config": _unchecked(s.config, k_trunc=0)}, r"`config.k_trunc` must be an integer >= 1"),
        ("config type", s, {"config": "sab"}, r"`config` must be a memcore.SABConfig"),
        ("w2 width", s, {"params": w2}, r"`params\['w2'\]` must have shape \(Hd, A\) = \(3, 2\)"),
        ("weights length", s, {"loss": Loss("mse", (1.0,))}, r"`loss.weights` must have one weight per step \(T = 4\)"),
        ("class id range", x, {"targets": x.targets - 1}, r"`targets` must hold class ids in \[0, C\)"),
    ]
    # fmt: on


@pytest.mark.parametrize("driver", ["bptt", "sab_bptt", "sab_sparse_replay"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_memcore_error(driver, case):
    """Every malformed SAB call raises MemcoreError naming the argument and what it must be."""
    _, s, over, pattern = case
    call = {"config": s.config, "loss": s.loss, **over}
    args = [over.get(k, getattr(s, k)) for k in ("params", "xs", "state0", "targets")]
    call = {k: v for k, v in call.items() if k in ("config", "loss")}
    with pytest.raises(MemcoreError, match=pattern):
        if driver == "bptt":
            routing.bptt("sab", *args, **call)
        else:
            getattr(routing, driver)(*args, **call)


@pytest.mark.parametrize("field", ["k_att", "k_trunc", "k_top"])
def test_sab_config_rejects_k_below_one(field):
    """SABConfig itself refuses k_att, k_trunc or k_top < 1 with a MemcoreError."""
    with pytest.raises(
        MemcoreError, match=rf"`{field}` must be an integer >= 1. Received: {field}=0"
    ):
        SABConfig(**{field: 0})


def test_bptt_sab_rejects_memformer_arguments():
    """bptt('sab') refuses resets, token_mask and truncate_every, which only Memformer has."""
    s = sab_sample(np.random.default_rng(4), T=3)
    with pytest.raises(MemcoreError, match=r"`truncate_every` must be None for step 'sab'"):
        routing.bptt("sab", s.params, s.xs, s.state0, s.targets, config=s.config, truncate_every=2)
