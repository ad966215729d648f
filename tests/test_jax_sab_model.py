"""SAB over any recurrent cell in JAX (backends/jax/sab_model.py) and the compiled trainer
(memcore/train/fast_jax.py): a GRU against plain autodiff of the same computation, one
trace per shape whatever the number of chunks, the truncation phase, memory held flat in
T, the forward against the reference, and training equal to the NumPy trainer."""

from __future__ import annotations

import functools

import attrs
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX backend needs jax (pip install 'memcore[jax]')")

import jax.numpy as jnp
from jax import lax

from memcore import SABConfig
from memcore.backends.jax import sab_model, sab_routing
from memcore.backends.jax.sab import sparse_retrieve
from memcore.backends.jax.sab_cells import gru_cell_fn, linear_readout
from memcore.reference import routing as ref
from memcore.reference.routing.samples import sab_sample
from memcore.train import fast_jax
from memcore.train.config import parse_config
from memcore.train.trainer import train

X64 = bool(jax.config.jax_enable_x64)
needs_x64 = pytest.mark.skipif(
    not X64, reason="float64 needs JAX_ENABLE_X64=1 before jax is imported (tests/conftest.py)"
)
T, B, I, HD, A, O = 6, 2, 2, 3, 2, 2


@attrs.frozen
class PhasedConfig(SABConfig):
    """SABConfig with a truncation phase (the release cuts entering t = k, 2k, ...)."""

    trunc_phase: int = 0


# k_trunc 3 with phase 1: chunks [1], [2, 3, 4], [5, 6]: padding before and after.
PHASED = PhasedConfig(
    k_top=2, k_att=2, k_trunc=3, threshold_grad=True, include_h0_memory=True, trunc_phase=1
)


def _gru_case(steps=T, seed=0):
    rng = np.random.default_rng(seed)

    def u(*shape):
        return jnp.asarray(rng.uniform(-0.8, 0.8, shape))

    params = {
        "gru_wx": u(I, 3 * HD),
        "gru_wh": u(HD, 3 * HD),
        "gru_b": u(3 * HD),
        "w1": u(HD, A),
        "w2": u(HD, A),
        "w3": u(A),
        "v1": u(HD, O),
        "v2": u(HD, O),
        "b_y": u(O),
    }
    xs, targets, h0 = u(steps, B, I), u(steps, B, O), u(B, HD)
    weights = jnp.asarray(rng.uniform(0.5, 1.5, steps))
    return params, xs, (h0, ()), targets, weights


def _plain_loss(params, h0, xs, targets, weights, *, config, truncate):
    """The same SAB-GRU written as a python loop over a growing list of memories."""
    h, memories, total = h0, ([h0] if config.include_h0_memory else []), 0.0
    for i in range(xs.shape[0]):
        t = i + 1
        if truncate and t > 1 and (t - 1) % config.k_trunc == config.trunc_phase:
            h = lax.stop_gradient(h)
        h_hat, _ = gru_cell_fn(params, xs[i], (h, ()))
        s = jnp.zeros_like(h_hat)
        if memories:
            s, _ = sparse_retrieve(
                h_hat, jnp.stack(memories, axis=1), params["w1"], params["w2"], params["w3"],
                k_top=config.k_top, eps=config.eps, threshold_grad=config.threshold_grad,
                block_score_grad=config.block_score_grad,
            )  # fmt: skip
        h = h_hat + s
        y = linear_readout(params, h, s)
        total = total + weights[i] * jnp.mean((y - targets[i]) ** 2)
        if t % config.k_att == 0:
            memories.append(h)
    return total, h


def _close(got, want, what):
    for path, g, w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(got),
        jax.tree_util.tree_leaves(want),
    ):  # fmt: skip
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=f"{what} {path[0]}")


@needs_x64
@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
def test_gru_drivers_equal_autodiff_of_the_plain_loop(truncate):
    """A GRU cell: sab_full_bptt equals autodiff of the python loop; sab_bptt and sparse
    replay equal it with h cut at the phased chunk starts (padding at both ends), also
    with unrolled scans and no chunk skipping."""
    params, xs, state0, targets, weights = _gru_case()
    plain = jax.jit(
        jax.value_and_grad(_plain_loss, argnums=(0, 1), has_aux=True),
        static_argnames=("config", "truncate"),
    )
    (want_loss, want_h), (want_dp, want_dh0) = plain(
        params, state0[0], xs, targets, weights, config=PHASED, truncate=truncate
    )
    # The GPU options (unrolled scans, every chunk replayed untested) change no gradient.
    replay_all = functools.partial(sab_model.sab_sparse_replay, unroll=2, skip=False)
    drivers = [sab_model.sab_bptt, sab_model.sab_sparse_replay, replay_all] if truncate else [
        sab_model.sab_full_bptt
    ]  # fmt: skip
    for i, driver in enumerate(drivers):
        loss, (dp, ds0), (h, aux) = driver(
            sab_model.GRU_NET, params, xs, state0, targets, weights, config=PHASED,
            state_grad=True,
        )  # fmt: skip
        what = f"driver {i}"
        _close((loss, h, dp, ds0[0]), (want_loss, want_h, want_dp, want_dh0), what)
        assert aux == () and ds0[1] == ()


def _counting_net(counter):
    def cell(params, x, state):
        counter.append(x.shape)  # runs once per trace, never when the compiled code runs
        return gru_cell_fn(params, x, state)

    return sab_model.SabNet(cell)


@needs_x64
def test_one_trace_per_shape_whatever_the_number_of_chunks():
    """Sparse replay traces the cell a fixed number of times per shape (not once per
    chunk: t is traced); a second call of the same shape does not trace at all."""
    config = SABConfig(k_top=2, k_att=2, k_trunc=2)
    traces, counts = [], []
    net = _counting_net(traces)
    for steps in (4, 8):  # 2 and 4 chunks
        params, xs, state0, targets, weights = _gru_case(steps)
        before = len(traces)
        sab_model.sab_sparse_replay(net, params, xs, state0, targets, weights, config=config)
        counts.append(len(traces) - before)
        again = _gru_case(steps, seed=1)
        sab_model.sab_sparse_replay(net, *again, config=config)
        assert len(traces) - before == counts[-1], "a second call of the same shape retraced"
    assert counts[0] == counts[1] <= 3, counts


@needs_x64
def test_replay_holds_the_bank_and_boundaries_not_the_steps():
    """Without memories, sparse replay's accounted bytes grow with T by exactly the
    chunk-entry states (h, c) while sab_bptt's grow by every step's residuals; with
    memories the replay's growth (bank, boundaries, the last chunk's reads of a bigger
    bank) stays far below sab_bptt's."""

    def held(method, steps, k_att):
        config = SABConfig(k_top=2, k_att=k_att, k_trunc=2)
        rng = np.random.default_rng(0)
        s = sab_sample(rng, T=steps, B=B, I=I, Hd=HD, A=A, O=O, config=config)
        args = (s.params, jnp.asarray(s.xs), jnp.asarray(s.targets), jnp.ones(steps))
        return sab_routing.peak_bytes(method, *args, config, "mse")

    four_chunks = 4 * 2 * B * HD * 8  # T 8 -> 16 adds 4 chunks of (h, c) in float64
    assert held("sparse_replay", 16, 100) - held("sparse_replay", 8, 100) == four_chunks
    assert held("sab_bptt", 16, 100) - held("sab_bptt", 8, 100) > 10 * four_chunks
    grow = held("sparse_replay", 16, 4) - held("sparse_replay", 8, 4)
    assert 0 < grow < (held("sab_bptt", 16, 4) - held("sab_bptt", 8, 4)) / 4


@needs_x64
def test_lstm_outputs_match_the_reference_forward():
    """sab_outputs (one scan, outputs from step ``first`` on) equals the reference's SAB
    forward; the LSTM routing drivers' gradients are pinned in test_jax_routing."""
    config = SABConfig(k_top=2, k_att=2, k_trunc=3, include_h0_memory=True)
    s = sab_sample(np.random.default_rng(3), T=T, B=B, I=I, Hd=HD, A=A, O=O, config=config)
    want = ref.sab_unroll(s.params, s.xs, s.state0, config=config)
    state0 = tuple(jnp.asarray(v) for v in s.state0)
    params = {k: jnp.asarray(v) for k, v in s.params.items()}
    ys, (h, c) = sab_model.sab_outputs(
        sab_model.LSTM_NET, params, jnp.asarray(s.xs), state0, config=config, first=2
    )
    _close((ys, h, c), (want.ys[2:], *want.final_state), "sab_outputs")


# ----------------------------------------------------------------------------- the trainer
CONFIG = {
    "task": {"name": "copy", "T": 3, "n_digits": 2, "n_symbols": 3, "one_hot": True},
    "model": {"kind": "sab", "hidden": 4, "k_top": 2, "k_att": 2, "include_h0_memory": True,
              "threshold_grad": True},
    "routing": {"method": "sparse_replay", "k_trunc": 3},
    "optim": {"lr": 0.05, "clip_norm": 0.5},
    "run": {"steps": 4, "batch_size": 3, "dtype": "float64", "log_every": 2,
            "checkpoint_every": 2, "eval_size": 4, "eval_batch": 4},
}  # fmt: skip


def _history(results):
    h = results["history"]
    return {k: h[k] for k in ("step", "loss", "grad_norm", "train", "eval")}


def _assert_same_run(got, want):
    g, w = _history(got), _history(want)
    assert g["step"] == w["step"]
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-10)
    np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-10)
    for a, b in zip(g["train"] + [got["final_eval"]], w["train"] + [want["final_eval"]]):
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-9)


@needs_x64
def test_compiled_trainer_equals_the_numpy_trainer_and_resumes(tmp_path, monkeypatch):
    """memcore train --backend jax (the compiled step) gives the NumPy trainer's losses,
    gradient norms, accuracies, evaluation and parameters in float64, and a run stopped
    after 2 steps and resumed equals the uninterrupted one."""
    config = parse_config(CONFIG)
    calls = []
    compiled = fast_jax.train_fast

    def spy(*a, **k):
        calls.append(1)
        return compiled(*a, **k)

    monkeypatch.setattr(fast_jax, "train_fast", spy)
    want = train(config, backend="numpy", out=str(tmp_path / "numpy"))
    assert not calls
    got = train(config, backend="jax", out=str(tmp_path / "jax"))
    assert calls == [1], "the jax run did not take the compiled path"
    assert got["backend"] == "jax" and got["steps_done"] == 4
    _assert_same_run(got, want)
    ckpt = {n: np.load(tmp_path / n / "checkpoint.npz") for n in ("numpy", "jax")}
    for key in ckpt["numpy"].files:
        if ckpt["numpy"][key].dtype.kind == "f":
            np.testing.assert_allclose(ckpt["jax"][key], ckpt["numpy"][key], rtol=1e-9, err_msg=key)
    first = train(config, backend="jax", out=str(tmp_path / "part"), stop_after=2)
    assert first["steps_done"] == 2 and not first["finished"]
    resumed = train(config, backend="jax", out=str(tmp_path / "part"), resume=True)
    _assert_same_run(resumed, got)
