"""Release-compatible SAB (issue 14.4): the reference's release scorer, sparsifier and
truncation phase against finite differences and an independent forward; torch and JAX
against the reference in float64; each release point changes results; the trainer runs."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from memcore.config import SABConfig
from memcore.errors import MemcoreError
from memcore.gradcheck import dot_product_test
from memcore.reference import routing
from memcore.reference.routing.sab_release import B_HH, is_cut, mode_params, sab_modes_bptt
from memcore.reference.sab_release import (
    release_scores_backward,
    release_scores_forward,
    release_sparsify_backward,
    release_sparsify_forward,
    retrieve_backward,
    retrieve_forward,
    threshold_index,
)
from memcore.routing_types import HEAD_PARAM, Loss

RELEASE = SABConfig(k_top=3, k_att=2, k_trunc=3, threshold_grad=True, include_h0_memory=True,
                    scorer="release", sparsify="release", truncation="release")  # fmt: skip


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-300, float(np.max(np.abs(b)))))


def _params(rng, config, *, I=1, Hd=4, A=3, O=3, C=3, two_biases=True, xent=True):
    def u(*shape, scale=1.0):
        return rng.uniform(-scale, scale, shape)

    p = {"lstm_w": u(I + Hd, 4 * Hd, scale=0.6), "lstm_b": u(4 * Hd, scale=0.3)}
    if two_biases:
        p[B_HH] = u(4 * Hd, scale=0.3)
    if config.scorer == "release":
        p["w_score"] = u(2 * Hd, scale=1.5)
    else:
        p.update(w1=u(Hd, A), w2=u(Hd, A), w3=u(A, scale=1.5))
    p.update(v1=u(Hd, O, scale=0.6), v2=u(Hd, O, scale=0.6), b_y=u(O, scale=0.3))
    if xent:
        p[HEAD_PARAM] = u(O, C)
    assert set(p) - {HEAD_PARAM} == set(mode_params(config, two_biases))
    return p


def _sample(seed, config, T=9, B=2, **kw):
    rng = np.random.default_rng(seed)
    p = _params(rng, config, **kw)
    Hd = p["lstm_w"].shape[1] // 4
    xs = rng.uniform(-1, 1, (T, B, p["lstm_w"].shape[0] - Hd))
    s0 = (rng.uniform(-0.5, 0.5, (B, Hd)), rng.uniform(-0.5, 0.5, (B, Hd)))
    C = p[HEAD_PARAM].shape[1]
    targets = rng.integers(0, C, (T, B))
    return p, xs, s0, targets, Loss("xent", tuple(rng.uniform(0.2, 1.0, T)))


# ----------------------------------------------------------------------------- the ops
def test_release_scorer_is_the_concatenated_form_and_its_backward_matches_fd():
    """a_i = w_score . tanh([h_hat; m_i]) literally, and the hand-written VJP passes the
    dot-product test in every input."""
    rng = np.random.default_rng(0)
    h, m, w = rng.normal(size=(2, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=8)
    a, _ = release_scores_forward(h, m, w)
    cat = np.concatenate([np.broadcast_to(h[:, None, :], m.shape), m], axis=-1)
    np.testing.assert_allclose(a, np.tanh(cat) @ w, rtol=1e-14)

    def vjp(xs, vs):
        return release_scores_backward(release_scores_forward(*xs)[1], vs[0])

    r = dot_product_test(lambda xs: release_scores_forward(*xs)[0], vjp, [h, m, w], rng)
    assert r.ok(rtol=1e-8), r


@pytest.mark.parametrize("threshold_grad", [True, False])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_release_sparsify_backward_matches_fd(n, threshold_grad):
    """k_top = 3: raw scores for N <= 3, else k_top - 1 = 2 weights normalised by sum + eps;
    the VJP passes the dot-product test (without threshold_grad, against the forward with
    the threshold held at its value)."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(3, n))
    w, _ = release_sparsify_forward(a, k_top=3, threshold_grad=threshold_grad)
    if n <= 3:
        np.testing.assert_array_equal(w, a)
    else:
        assert (np.count_nonzero(w, axis=1) == 2).all()
        thr = np.sort(a, axis=1)[:, -3:-2] + 1e-7
        z = np.maximum(a - thr, 0)
        np.testing.assert_allclose(w, z / (z.sum(1, keepdims=True) + 1e-7), rtol=1e-14)

    held = np.sort(a, axis=1)[:, -3:-2] + 1e-7  # threshold_grad False: a constant threshold

    def f(xs):
        if threshold_grad or n <= 3:
            return release_sparsify_forward(xs[0], k_top=3, threshold_grad=True)[0]
        z = np.maximum(xs[0] - held, 0)
        return z / (z.sum(1, keepdims=True) + 1e-7)

    def vjp(xs, vs):
        cache = release_sparsify_forward(xs[0], k_top=3, threshold_grad=threshold_grad)[1]
        return release_sparsify_backward(cache, vs[0])

    # The k_top-th entry sits eps = 1e-7 below the threshold: a step below that keeps it out.
    r = dot_product_test(f, vjp, [a], rng, eps=1e-6 if threshold_grad else 1e-8)
    assert r.ok(rtol=1e-8 if threshold_grad else 1e-6), r


def test_threshold_gradient_goes_whole_to_the_lowest_tied_index():
    """Scores tied at the k_top-th place: the stable order names the lowest index at that
    position, which alone gets -sum(d_a) (the tied neighbour gets nothing)."""
    a = np.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.5]])  # k_top = 3: sorted 5, 3(2), 3(3), 3(4)
    assert threshold_index(a, 3).tolist() == [3]
    w, cache = release_sparsify_forward(a, k_top=3, threshold_grad=True)
    assert np.count_nonzero(w) == 1  # only 5 clears 3 + eps
    (da,) = release_sparsify_backward(cache, np.array([[1.0, 0, 0, 0, 0, 0]]))
    assert da[0, 3] == -da[0, 0] and da[0, 2] == 0.0 and da[0, 4] == 0.0


def test_tie_order_of_the_backends_sorts():
    """jax.lax.top_k and torch.sort(stable=True, descending=True) order ties lowest index
    first, the order threshold_index defines (torch.topk's CPU tie order is unspecified and
    differs, e.g. top-3 of [2, 2, 2, 2, 9, 2] is [4, 3, 5] on torch 2.13: documented in
    docs/semantics.md, so the torch release mode sorts instead)."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    a = np.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0, 9.0, 2.0]])
    want = np.argsort(-a, axis=1, kind="stable")[:, :3]
    got_t = torch.sort(torch.tensor(a), dim=1, descending=True, stable=True).indices[:, :3]
    np.testing.assert_array_equal(np.asarray(jax.lax.top_k(a, 3)[1]), want)
    np.testing.assert_array_equal(got_t.numpy(), want)


@pytest.mark.parametrize("scorer", ["memcore", "release"])
@pytest.mark.parametrize("sparsify", ["memcore", "release"])
@pytest.mark.parametrize("block", [False, True])
def test_retrieve_every_mode_matches_fd(scorer, sparsify, block):
    """The read with either scorer and sparsifier (threshold gradient on): the VJP in h_hat,
    the memories and the scorer weights passes the dot-product test (block_score_grad only
    removes the score path into h_hat and the memories)."""
    rng = np.random.default_rng(7)
    cfg = SABConfig(k_top=2, threshold_grad=True, scorer=scorer, sparsify=sparsify,
                    block_score_grad=block)  # fmt: skip
    p = {k: v for k, v in _params(rng, cfg, xent=False).items()
         if k in ("w1", "w2", "w3", "w_score")}  # fmt: skip
    names = list(p)
    h, m = rng.normal(size=(2, 4)), rng.normal(size=(2, 6, 4))

    def f(xs):
        return retrieve_forward(xs[0], xs[1], dict(zip(names, xs[2:])), cfg)[0]

    def vjp(xs, vs):
        cache = retrieve_forward(xs[0], xs[1], dict(zip(names, xs[2:])), cfg)[1]
        dh, dm, dp = retrieve_backward(cache, tuple(vs))
        return [dh, dm, *(dp[n] for n in names)]

    diff = [not block, not block] + [True] * len(names)
    r = dot_product_test(f, vjp, [h, m, *p.values()], rng, differentiable=diff)
    assert r.ok(rtol=1e-7), r


# ----------------------------------------------------------------------------- the driver
def test_memcore_mode_equals_the_reference_sab_bptt():
    """Every mode 'memcore' and one bias: sab_modes_bptt is sab_bptt (and, untruncated,
    sab_full_bptt) to 1e-12."""
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=3, threshold_grad=True, include_h0_memory=True)
    p, xs, s0, tg, loss = _sample(1, cfg, two_biases=False)
    for truncate, ref in ((True, routing.sab_bptt), (False, routing.bptt)):
        got = sab_modes_bptt(p, xs, s0, tg, config=cfg, loss=loss, truncate=truncate)
        args = ("sab",) if ref is routing.bptt else ()
        want = ref(*args, p, xs, s0, tg, config=cfg, loss=loss)
        assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss)
        for k in p:
            assert _rel(got.grads[k], want.grads[k]) < 1e-12, k
        assert _rel(got.d_state0[0], want.d_state0[0]) < 1e-12


def _plain_loss(p, xs, s0, tg, loss, cfg, held=None):
    """An independent NumPy forward of the release model (concatenated scorer, k-th + eps
    threshold, raw scores when N <= k_top); ``held[t]`` replaces (h, c) entering step t."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    h, c = s0
    mems, total, hd = [h] if cfg.include_h0_memory else [], 0.0, h.shape[1]
    b = p["lstm_b"] + p.get(B_HH, 0.0)
    for t in range(1, xs.shape[0] + 1):
        if held is not None and t in held:
            h, c = held[t]
        z = np.concatenate([xs[t - 1], h], 1) @ p["lstm_w"] + b
        i, f, g, o = (
            sig(z[:, :hd]),
            sig(z[:, hd : 2 * hd]),
            np.tanh(z[:, 2 * hd : 3 * hd]),
            sig(z[:, 3 * hd :]),
        )
        c = f * c + i * g
        h_hat = o * np.tanh(c)
        s = np.zeros_like(h_hat)
        if mems:
            m = np.stack(mems, 1)
            a = (
                np.tanh(np.concatenate([np.broadcast_to(h_hat[:, None], m.shape), m], -1))
                @ p["w_score"]
            )
            if len(mems) <= cfg.k_top:
                w = a
            else:
                zz = np.maximum(a - (np.sort(a, 1)[:, -cfg.k_top :][:, :1] + cfg.eps), 0)
                w = zz / (zz.sum(1, keepdims=True) + cfg.eps)
            s = np.einsum("bn,bnh->bh", w, m)
        h = h_hat + s
        logits = (h @ p["v1"] + s @ p["v2"] + p["b_y"]) @ p[HEAD_PARAM]
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += loss.weights[t - 1] * np.mean(lse - logits[np.arange(len(h)), tg[t - 1]])
        if t % cfg.k_att == 0:
            mems.append(h)
    return total


@pytest.mark.parametrize("truncate", [False, True])
def test_release_mode_gradient_matches_fd_of_the_cut_graph(truncate):
    """Release mode end to end (two biases, phantom h0, raw scores for the first reads, the
    release threshold with its gradient, cuts entering t = 3, 6, 9): the reference's loss
    equals an independent forward and its gradient passes the dot-product test against
    central differences of that forward with (h, c) held at the cuts."""
    p, xs, s0, tg, loss = _sample(2, RELEASE)
    held = _held_states(p, xs, s0) if truncate else None
    names = list(p)

    def f(arrays):
        pp = dict(zip(names, arrays[:-2]))
        return np.array(_plain_loss(pp, xs, (arrays[-2], arrays[-1]), tg, loss, RELEASE, held))

    def vjp(arrays, vs):
        r = sab_modes_bptt(dict(zip(names, arrays[:-2])), xs, (arrays[-2], arrays[-1]), tg,
                           config=RELEASE, loss=loss, truncate=truncate)  # fmt: skip
        assert abs(r.loss - float(f(arrays))) <= 1e-12 * abs(r.loss)
        return [r.grads[n] * vs[0] for n in names] + [d * vs[0] for d in r.d_state0]

    arrays = [p[n] for n in names] + list(s0)
    r = dot_product_test(f, vjp, arrays, np.random.default_rng(3))
    assert r.ok(rtol=1e-7), r


def _held_states(p, xs, s0):
    """{t: (h, c) entering t} for the release cut steps of RELEASE (k_trunc 3: t = 3, 6, 9)."""
    from memcore.reference.routing.sab_release import sab_modes_step
    from memcore.reference.steps import SabState

    state, held = SabState(s0[0], s0[1], (s0[0],)), {}
    for t in range(1, xs.shape[0] + 1):
        if is_cut(t, RELEASE):
            held[t] = (state.h, state.c)
        state = sab_modes_step(p, xs[t - 1], state, config=RELEASE, t=t)[0]
    assert sorted(held) == [3, 6, 9]
    return held


@pytest.mark.parametrize(
    "field, memcore_value",
    [("scorer", None), ("sparsify", "memcore"), ("truncation", "memcore"), ("bias", None)],
)
def test_each_release_point_changes_the_result(field, memcore_value):
    """Switching one point back to memcore's choice changes the loss or the gradient."""
    p, xs, s0, tg, loss = _sample(4, RELEASE, T=12)
    base = sab_modes_bptt(p, xs, s0, tg, config=RELEASE, loss=loss)
    cfg, q = RELEASE, dict(p)
    if field == "scorer":
        cfg = attrs.evolve(RELEASE, scorer="memcore")
        rng = np.random.default_rng(0)
        hd = p["lstm_w"].shape[1] // 4
        del q["w_score"]
        q.update(w1=rng.normal(size=(hd, 3)), w2=rng.normal(size=(hd, 3)), w3=rng.normal(size=3))
    elif field == "bias":
        q["lstm_b"] = p["lstm_b"] + q.pop(B_HH)  # same forward, one parameter
    else:
        cfg = attrs.evolve(RELEASE, **{field: memcore_value})
    other = sab_modes_bptt(q, xs, s0, tg, config=cfg, loss=loss)
    if field == "bias":
        assert abs(other.loss - base.loss) < 1e-12  # the forward is the same ...
        np.testing.assert_array_equal(base.grads["lstm_b"], base.grads[B_HH])  # two updates
    elif field == "truncation":
        assert abs(other.loss - base.loss) < 1e-12  # cuts change only the gradient
        assert _rel(other.grads["lstm_w"], base.grads["lstm_w"]) > 1e-3
    else:
        assert abs(other.loss - base.loss) > 1e-6


def test_release_sparsify_query_independent_and_k_minus_one():
    """With the release scorer and N > k_top the weights do not depend on h_hat, and with
    distinct scores exactly k_top - 1 memories get weight (memcore's rule: k_top)."""
    rng = np.random.default_rng(5)
    m, w = rng.normal(size=(1, 8, 4)), {"w_score": rng.normal(size=8)}
    cfg = attrs.evolve(RELEASE, k_top=4)
    (_, w1), _ = retrieve_forward(rng.normal(size=(1, 4)), m, w, cfg)
    (_, w2), _ = retrieve_forward(rng.normal(size=(1, 4)), m, w, cfg)
    np.testing.assert_allclose(w1, w2, rtol=1e-12)
    assert np.count_nonzero(w1) == 3
    (_, w3), _ = retrieve_forward(
        rng.normal(size=(1, 4)), m, w, attrs.evolve(cfg, sparsify="memcore")
    )
    assert np.count_nonzero(w3) == 4


def test_config_fields_validate_and_default_to_memcore():
    """The new SABConfig fields default to memcore's semantics and refuse other values."""
    cfg = SABConfig()
    assert (cfg.scorer, cfg.sparsify, cfg.truncation, cfg.trunc_phase) == ("memcore",) * 3 + (0,)
    assert SABConfig(k_trunc=5, truncation="release").trunc_phase == 4
    for field in ("scorer", "sparsify", "truncation"):
        with pytest.raises(MemcoreError, match=f"`{field}` must be one of 'memcore', 'release'"):
            SABConfig(**{field: "paper"})
    p, xs, s0, tg, loss = _sample(6, RELEASE)
    with pytest.raises(MemcoreError, match="w_score"):
        sab_modes_bptt(p, xs, s0, tg, config=attrs.evolve(RELEASE, scorer="memcore"), loss=loss)


# ----------------------------------------------------------------------------- torch, JAX
MODES = [
    RELEASE,
    attrs.evolve(RELEASE, scorer="memcore"),
    attrs.evolve(RELEASE, sparsify="memcore", truncation="memcore", threshold_grad=False),
    attrs.evolve(RELEASE, threshold_grad=False, block_score_grad=True, include_h0_memory=False),
]


def _reference_outputs(p, xs, s0, cfg):
    from memcore.reference.routing.sab_release import sab_modes_step
    from memcore.reference.steps import SabState

    state, ys = SabState(s0[0], s0[1], (s0[0],) if cfg.include_h0_memory else ()), []
    for t in range(1, xs.shape[0] + 1):
        state, y, _ = sab_modes_step(p, xs[t - 1], state, config=cfg, t=t)
        ys.append(y)
    return np.stack(ys)


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_torch_drivers_equal_the_reference_in_every_mode(mode):
    """torch sab_bptt (truncated and not), sparse replay and the evaluation forward equal the
    reference in float64 (1e-10), the truncation phase taken from the config."""
    torch = pytest.importorskip("torch")
    from memcore.backends.torch import cells, sab_model
    from memcore.backends.torch.sab_forward import sab_outputs

    cfg = MODES[mode]
    p, xs, s0, tg, loss = _sample(10 + mode, cfg, T=11)
    P = {k: torch.tensor(v) for k, v in p.items()}
    X, S0, TG = torch.tensor(xs), tuple(torch.tensor(s) for s in s0), torch.tensor(tg)
    for truncate in (True, False):
        want = sab_modes_bptt(p, xs, s0, tg, config=cfg, loss=loss, truncate=truncate)
        runs = [sab_model.sab_bptt(cells.lstm, P, X, S0, TG, config=cfg, loss=loss,
                                   truncate=truncate)]  # fmt: skip
        if truncate:
            runs.append(
                sab_model.sab_sparse_replay(cells.lstm, P, X, S0, TG, config=cfg, loss=loss)
            )
        for got in runs:
            assert abs(got.loss - want.loss) <= 1e-12 * abs(want.loss)
            for k in p:
                assert _rel(got.grads[k].numpy(), want.grads[k]) < 1e-10, (truncate, k)
            assert _rel(got.d_state0[0].numpy(), want.d_state0[0]) < 1e-10
    ys = sab_outputs(cells.lstm, P, X, S0, config=cfg, first=2).numpy()
    assert _rel(ys, _reference_outputs(p, xs, s0, cfg)[2:]) < 1e-12


@pytest.mark.parametrize("mode", [0])  # each mode compiles every driver (slow): one mode
def test_jax_drivers_equal_the_reference(mode):
    """JAX sab_bptt, full BPTT, sparse replay and the forward equal the reference in
    float64 (1e-10): the config selects the retrieval and the truncation phase."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from memcore.backends.jax import sab_model as jm

    cfg = MODES[mode]
    p, xs, s0, tg, loss = _sample(20 + mode, cfg, T=11)
    J = jax.tree_util.tree_map(jax.numpy.asarray, p)
    w = jax.numpy.asarray(loss.weights)
    drivers = ((jm.sab_sparse_replay, True), (jm.sab_full_bptt, False))
    for driver, truncate in drivers:
        want = sab_modes_bptt(p, xs, s0, tg, config=cfg, loss=loss, truncate=truncate)
        value, (grads, d0), _ = driver(jm.LSTM_NET, J, xs, s0, tg, w, config=cfg, loss="xent",
                                       state_grad=True)  # fmt: skip
        assert abs(float(value) - want.loss) <= 1e-12 * abs(want.loss), driver
        for k in p:
            assert _rel(np.asarray(grads[k]), want.grads[k]) < 1e-10, (driver, k)
        assert _rel(np.asarray(d0[0]), want.d_state0[0]) < 1e-10, driver
    ys, _ = jm.sab_outputs(jm.LSTM_NET, J, xs, s0, config=cfg, first=2)
    assert _rel(np.asarray(ys), _reference_outputs(p, xs, s0, cfg)[2:]) < 1e-12


# ----------------------------------------------------------------------------- training
def _write_tiny(src, dst, steps):
    import re

    text = src.read_text()
    for key, value in (
        ("T", 6),
        ("n_digits", 3),
        ("hidden", 8),
        ("steps", steps),
        ("batch_size", 4),
        ("log_every", 1),
        ("checkpoint_every", 0),
        ("eval_every", 0),
        ("eval_size", 8),
        ("eval_batch", 8),
        ("train_set", 8),
    ):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    text = re.sub(r"(?m)^transfer_T = .*$", "transfer_T = []", text)
    dst.write_text(text)


@pytest.mark.parametrize("backend", ["torch"])
def test_trainer_runs_release_mode_with_its_options(tmp_path, backend):
    """memcore train on configs/copy_sab_t100_release.toml (shrunk): trains on the compiled
    path, release parameters (w_score, lstm_b_hh, no head_w), a fixed data set, finite loss."""
    pytest.importorskip(backend)
    import pathlib

    from memcore.train.config import load_config
    from memcore.train.model import core_config, init_params, release_points
    from memcore.train.tasks import batch_rng, train_index
    from memcore.train.trainer import train

    _write_tiny(pathlib.Path("configs/copy_sab_t100_release.toml"), tmp_path / "c.toml", 3)
    cfg = load_config(tmp_path / "c.toml")
    assert core_config(cfg).trunc_phase == 4 and core_config(cfg).sparsify == "release"
    assert len(release_points(cfg)) == 5
    p = init_params(cfg, batch_rng(0, 2, 0))
    assert {"w_score", "lstm_b_hh"} <= set(p) and HEAD_PARAM not in p and "w1" not in p
    assert p["v1"].shape == (8, 10) and abs(p["w_score"]).max() < 0.06
    assert [train_index(cfg.run, s) for s in range(5)] == [0, 1, 0, 1, 0]
    res = train(cfg, backend=backend, out=str(tmp_path / "run"))
    assert res["finished"] and np.isfinite(res["history"]["loss"]).all()
    with pytest.raises(MemcoreError, match="compiled path only"):
        from memcore.train.model import routed_gradient

        routed_gradient(None, cfg, p, None, None, ())


def test_repro_scripts_run_and_resume_on_cpu(tmp_path):
    """scripts/gpu_issue14_repro.sh at tiny sizes on the CPU: a second call resumes the first
    call's run from its tarball and starts another; transfer evaluation; the table."""
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("torch")
    root = pathlib.Path.cwd()
    for steps, cfgs in ((2, tmp_path / "c1"), (3, tmp_path / "c2")):
        cfgs.mkdir()
        for name in ("copy_bptt_t100", "copy_tbptt_t100", "copy_sab_t100", "copy_sab_t100_release"):
            _write_tiny(root / "configs" / f"{name}.toml", cfgs / f"{name}.toml", steps)
    env = dict(
        os.environ,
        ROOT=str(tmp_path / "r1"),
        DEVICE="cpu",
        CONFIG_DIR=str(tmp_path / "c1"),
        OUT=str(tmp_path),
        PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    script = str(root / "scripts/gpu_issue14_repro.sh")
    env["RUNS"] = "sab_release"  # the first call trains one run (2 steps) ...
    subprocess.run(["bash", script, "60"], env=env, check=True, capture_output=True, timeout=300)
    env["RUNS"] = "bptt sab_release"  # ... the second resumes it (to step 3) and starts one more
    assert (tmp_path / "runs.tar.gz").is_file() and (tmp_path / "README.md").is_file()
    env.update(ROOT=str(tmp_path / "r2"), CONFIG_DIR=str(tmp_path / "c2"), EVAL="1", EVAL_T="9")
    out = subprocess.run(
        ["bash", script, "60", str(tmp_path / "runs.tar.gz")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert "sab_release 3" in out and "bptt 3" in out
    assert "--resume" in (tmp_path / "r2" / "logs" / "sab_release.log").read_text()
    readme = (tmp_path / "r2" / "README.md").read_text()
    assert "| SAB k_trunc 5 k_top 5 (release mode) | 3 |" in readme and "| 99.8 |" in readme
    transfer = (tmp_path / "r2" / "runs" / "sab_release" / "transfer.json").read_text()
    assert '"9"' in transfer and '"6"' in transfer
