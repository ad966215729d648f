"""The JAX routing drivers: BPTT (scan), MRBP (checkpointed scan and step-by-step replay),
sab_bptt and SAB sparse replay against each other, the reference and the torch backend;
what MRBP's scan saves, memory accounting, chained rollouts and bad input."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX backend needs jax (pip install 'memcore[jax]')")

import jax.numpy as jnp
from hypothesis import given

from memcore import MemcoreError, MemoryConfig, SABConfig
from memcore.backends.jax import JaxBackend, routing, sab_routing
from memcore.conformance.compare import compare
from memcore.conformance.strategies import RoutingLayout, build_case, seeds
from memcore.conformance.tolerances import Tol, tolerance
from memcore.reference import routing as ref
from memcore.routing_types import Loss

BE = JaxBackend()
X64 = BE.x64_enabled()
needs_x64 = pytest.mark.skipif(
    not X64, reason="float64 needs JAX_ENABLE_X64=1 before jax is imported (tests/conftest.py)"
)
TIGHT = Tol(rtol=1e-10, atol=1e-12)

# Fixed layouts (shapes and static settings); hypothesis draws the values, so each driver
# compiles once per layout. Together they cover resets, token masks, truncation, both
# losses, zero loss weights, every SAB flag and a chunk that sparse replay must skip.
MF = {
    "mse-resets-mask-trunc": RoutingLayout(
        "memformer",
        dict(T=4, B=2, L=3, K=2, H=2, dh=2, C=0),
        MemoryConfig(slots=2, dim=4, heads=2, tau=0.5),
        Loss("mse", (1.0, 0.0, 2.0, 0.5)),
        resets=True,
        token_mask=True,
        truncate_every=2,
    ),
    "xent": RoutingLayout(
        "memformer",
        dict(T=3, B=1, L=2, K=3, H=1, dh=3, C=3),
        MemoryConfig(slots=3, dim=3, heads=1),
        Loss("xent"),
    ),
}
SAB = {
    "threshold-h0": RoutingLayout(
        "sab",
        dict(T=4, B=2, I=2, Hd=3, A=2, O=2, C=0),
        SABConfig(k_top=1, k_att=2, k_trunc=2, threshold_grad=True, include_h0_memory=True),
        Loss("mse"),
    ),
    "skip-block-xent": RoutingLayout(
        "sab",
        dict(T=4, B=2, I=1, Hd=2, A=2, O=2, C=3),
        SABConfig(k_top=2, k_att=3, k_trunc=2, block_score_grad=True),
        Loss("xent", (0.0, 0.0, 1.0, 1.0)),
    ),
}


def _to(x, dtype):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return tuple(_to(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dtype) for k, v in x.items()}
    x = np.asarray(x)
    return BE.from_numpy(x, dtype=dtype if x.dtype.kind == "f" else None)


def _args(case, dtype="float64"):
    return (
        _to(case.params, dtype),
        _to(case.xs, dtype),
        _to(case.state0, dtype),
        _to(case.targets, dtype),
    )


def _mf_kw(case):
    return dict(
        config=case.config,
        loss=case.loss,
        resets=_to(case.resets, None),
        token_mask=_to(case.token_mask, None),
        truncate_every=case.truncate_every,
    )


def _leaves(result):
    state = result.d_state0 if isinstance(result.d_state0, tuple) else (result.d_state0,)
    final = result.final_state if isinstance(result.final_state, tuple) else (result.final_state,)
    named = [("loss", np.float64(result.loss))]
    named += [(f"grad[{k}]", result.grads[k]) for k in sorted(result.grads)]
    named += [(f"d_state0[{i}]", s) for i, s in enumerate(state)]
    named += [(f"final_state[{i}]", s) for i, s in enumerate(final)]
    return named


def _agree(got, want, tol, what):
    """Every loss, gradient and state of two RoutingResults within ``tol``."""
    got_l, want_l = _leaves(got), _leaves(want)
    assert [n for n, _ in got_l] == [n for n, _ in want_l], what
    bad = []
    for (name, g), (_, w) in zip(got_l, want_l):
        c = compare(
            f"{what} {name}", np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64), tol
        )
        if not c.ok:
            bad.append(c.describe())
    assert not bad, "\n".join(bad)


@needs_x64
@pytest.mark.parametrize("name", list(MF))
@given(seed=seeds)
def test_memformer_bptt_and_both_mrbp_variants_match_the_reference(name, seed):
    """Scan BPTT, checkpointed-scan MRBP and replay MRBP equal the reference BPTT (float64)."""
    case = build_case(MF[name], seed)
    want = ref.bptt(
        "memformer",
        case.params,
        case.xs,
        case.state0,
        case.targets,
        config=case.config,
        loss=case.loss,
        resets=case.resets,
        token_mask=case.token_mask,
        truncate_every=case.truncate_every,
    )
    kw = _mf_kw(case)
    scan = BE.bptt("memformer", *_args(case), **kw)
    ckpt = BE.mrbp(*_args(case), method="checkpoint", **kw)
    replay = BE.mrbp(*_args(case), method="replay", **kw)
    for label, got in (("bptt", scan), ("mrbp checkpoint", ckpt), ("mrbp replay", replay)):
        _agree(got, want, TIGHT, f"{case.label} {label}")
    _agree(ckpt, replay, TIGHT, f"{case.label} checkpoint vs replay")


@needs_x64
@pytest.mark.parametrize("name", list(SAB))
@given(seed=seeds)
def test_sab_drivers_match_the_reference_and_each_other(name, seed):
    """BPTT, sab_bptt and sparse replay equal the reference's; replay == sab_bptt; same chunks."""
    case = build_case(SAB[name], seed)
    kw = dict(config=case.config, loss=case.loss)
    np_args = (case.params, case.xs, case.state0, case.targets)
    full = BE.bptt("sab", *_args(case), **kw)
    masked = BE.sab_bptt(*_args(case), **kw)
    replay = BE.sab_sparse_replay(*_args(case), **kw)
    _agree(full, ref.bptt("sab", *np_args, **kw), TIGHT, f"{case.label} bptt")
    _agree(masked, ref.sab_bptt(*np_args, **kw), TIGHT, f"{case.label} sab_bptt")
    want_replay = ref.sab_sparse_replay(*np_args, **kw)
    _agree(replay, want_replay, TIGHT, f"{case.label} sparse replay")
    _agree(replay, masked, TIGHT, f"{case.label} replay vs sab_bptt")
    assert replay.replayed_chunks == want_replay.replayed_chunks


@needs_x64
def test_skipped_chunk_really_receives_no_gradient():
    """A chunk with zero loss weights and no memory read later is skipped, and under sab_bptt
    every gradient reaching its steps (inputs and initial state) is exactly zero."""
    case = build_case(
        SAB["skip-block-xent"], 5
    )  # chunk 0 = steps 1-2: weights 0, writes no memory (k_att=3)
    replay = BE.sab_sparse_replay(*_args(case), config=case.config, loss=case.loss)
    assert replay.replayed_chunks == (1,)
    params, xs, state0, targets = _args(case)
    weights = jnp.asarray(case.loss.weights)

    def loss_of(xs_, s0):
        return sab_routing._sab_graph(
            params, s0, xs_, targets, weights, config=case.config, kind="xent", truncate=True
        )[0]

    dxs, ds0 = jax.grad(loss_of, argnums=(0, 1))(xs, state0)
    assert np.all(np.asarray(dxs)[:2] == 0) and np.any(np.asarray(dxs)[2:] != 0)
    assert all(np.all(np.asarray(d) == 0) for d in ds0)
    assert all(np.all(np.asarray(d) == 0) for d in replay.d_state0)


def test_float32_routing_matches_the_float64_reference():
    """In float32 checkpointed MRBP and sparse replay stay within the routing tolerance."""
    tol = tolerance("routing", "float32", "routing")
    case = build_case(MF["mse-resets-mask-trunc"], 1)
    want = ref.mrbp(
        *(case.params, case.xs, case.state0, case.targets),
        config=case.config,
        loss=case.loss,
        resets=case.resets,
        token_mask=case.token_mask,
        truncate_every=case.truncate_every,
    )
    got = BE.mrbp(*_args(case, "float32"), method="checkpoint", **_mf_kw(case))
    assert str(got.grads["read_wq"].dtype) == "float32"
    _agree(got, want, tol, "float32 mrbp checkpoint")
    case = build_case(SAB["threshold-h0"], 1)
    want = ref.sab_sparse_replay(
        case.params, case.xs, case.state0, case.targets, config=case.config, loss=case.loss
    )
    got = BE.sab_sparse_replay(*_args(case, "float32"), config=case.config, loss=case.loss)
    _agree(got, want, tol, "float32 sparse replay")


@needs_x64
def test_checkpointed_scan_saves_only_the_memory_carries():
    """MRBP's scan keeps M_0..M_{T-1} stacked and no per-step activation; BPTT's scan keeps many."""
    case = build_case(MF["mse-resets-mask-trunc"], 0)
    params, xs, m0, targets = _args(case)
    kw = _mf_kw(case)
    weights = jnp.asarray(case.loss.weights)
    t, b = xs.shape[:2]
    k, d = m0.shape[1:]
    owned = {
        id(a)
        for a in jax.tree_util.tree_leaves(
            (params, m0, xs, targets, kw["resets"], kw["token_mask"], weights)
        )
    }

    def saved(remat):
        def fn(p, m):
            return routing._mf_unroll(
                p,
                m,
                xs,
                targets,
                weights,
                kw["resets"],
                kw["token_mask"],
                config=case.config,
                kind="mse",
                truncate_every=2,
                remat=remat,
            )

        _, pull, _ = jax.vjp(fn, params, m0, has_aux=True)
        return [a for a in jax.tree_util.tree_leaves(pull) if id(a) not in owned and a.ndim > 1]

    ckpt, full = saved(True), saved(False)
    assert [(a.shape, str(a.dtype)) for a in ckpt] == [((t, b, k, d), "float64")]
    assert len(full) > 10 and sum(a.nbytes for a in full) > 5 * ckpt[0].nbytes


@needs_x64
def test_peak_cache_bytes_grow_as_each_driver_should():
    """Replay MRBP adds exactly |M| per extra step; BPTT grows linearly and much faster."""
    base = MF["mse-resets-mask-trunc"]

    def run(steps, method):
        layout = RoutingLayout(
            base.step,
            dict(base.dims, T=steps),
            base.config,
            Loss("mse"),
            resets=True,
            token_mask=True,
            truncate_every=2,
        )
        case = build_case(layout, 0)
        if method == "bptt":
            return BE.bptt("memformer", *_args(case), **_mf_kw(case)).peak_cache_bytes
        return BE.mrbp(*_args(case), method=method, **_mf_kw(case)).peak_cache_bytes

    m_bytes = 2 * 2 * 4 * 8  # B * K * D * itemsize
    replay = [run(n, "replay") for n in (2, 4, 6)]
    assert replay[1] - replay[0] == replay[2] - replay[1] == 2 * m_bytes
    bptt = [run(n, "bptt") for n in (2, 4)]
    ckpt = [run(n, "checkpoint") for n in (2, 4)]
    assert bptt[1] - bptt[0] > 4 * (ckpt[1] - ckpt[0]) > 0
    assert ckpt[1] - ckpt[0] >= 2 * m_bytes


@needs_x64
def test_chained_mrbp_rollouts_equal_one_truncated_bptt():
    """Two MRBP rollouts chained through M_T sum to one BPTT truncated at their boundary."""
    layout = MF["mse-resets-mask-trunc"]
    case = build_case(
        RoutingLayout(layout.step, layout.dims, layout.config, Loss("mse"), True, True, 2), 3
    )
    kw = _mf_kw(case)
    params, xs, m0, targets = _args(case)
    whole = BE.bptt("memformer", params, xs, m0, targets, **kw)
    first = BE.mrbp(
        params,
        xs[:2],
        m0,
        targets[:2],
        method="replay",
        **dict(kw, resets=kw["resets"][:2], token_mask=kw["token_mask"][:2]),
    )
    second = BE.mrbp(
        params,
        xs[2:],
        first.final_state,
        targets[2:],
        method="replay",
        **dict(kw, resets=kw["resets"][2:], token_mask=kw["token_mask"][2:]),
    )
    for k in whole.grads:
        c = compare(
            k, np.asarray(first.grads[k] + second.grads[k]), np.asarray(whole.grads[k]), TIGHT
        )
        assert c.ok, c.describe()
    assert compare("dM0", np.asarray(first.d_state0), np.asarray(whole.d_state0), TIGHT).ok
    assert compare("M_T", np.asarray(second.final_state), np.asarray(whole.final_state), TIGHT).ok


@needs_x64
def test_bad_routing_input_raises_the_reference_message():
    """Mismatched T, wrong state shapes, bad step/method names: the reference's MemcoreError."""
    mf = build_case(MF["xent"], 0)
    sb = build_case(SAB["threshold-h0"], 0)
    kw = dict(config=mf.config, loss=mf.loss)
    bad_calls = [
        (lambda b, a: b.bptt("memformer", a[0], a[1], a[2], a[3][:2], **kw), mf),
        (lambda b, a: b.mrbp(a[0], a[1], a[2][:, :1], a[3], **kw), mf),
        (lambda b, a: b.mrbp(a[0], a[1][:0], a[2], a[3][:0], **kw), mf),
        (
            lambda b, a: b.sab_bptt(
                a[0], a[1], (a[2][0], a[2][1][:, :1]), a[3], config=sb.config, loss=sb.loss
            ),
            sb,
        ),
        (
            lambda b, a: b.sab_sparse_replay(
                a[0], a[1], a[2], a[3][1:], config=sb.config, loss=sb.loss
            ),
            sb,
        ),
        (lambda b, a: b.bptt("sab", *a, config=sb.config, loss=sb.loss, truncate_every=2), sb),
    ]
    for i, (call, case) in enumerate(bad_calls):
        with pytest.raises(MemcoreError) as want:
            call(ref, (case.params, case.xs, case.state0, case.targets))
        with pytest.raises(MemcoreError) as got:
            call(BE, _args(case))
        assert str(got.value) == str(want.value), i
    with pytest.raises(MemcoreError, match="`step` must be"):
        BE.bptt("lstm", *_args(mf), **kw)
    with pytest.raises(MemcoreError, match="`method` must be 'checkpoint' or 'replay'"):
        BE.mrbp(*_args(mf), method="revolve", **kw)


@needs_x64
def test_torch_and_jax_routing_agree():
    """Cross-framework: torch and jax agree on MRBP, BPTT and sparse replay (float64)."""
    pytest.importorskip("torch", reason="the cross-framework check needs torch")
    try:
        from memcore.backends.torch import TorchBackend
    except ImportError as exc:  # pragma: no cover - depends on the parallel torch work
        pytest.skip(f"memcore.backends.torch does not import yet: {exc}")
    tb = TorchBackend()

    def on(be, x):
        if x is None:
            return None
        if isinstance(x, (tuple, list)):
            return tuple(on(be, v) for v in x)
        if isinstance(x, dict):
            return {k: on(be, v) for k, v in x.items()}
        return be.from_numpy(np.asarray(x))

    def numpy_result(be, r):
        def back(x):
            return tuple(back(v) for v in x) if isinstance(x, tuple) else be.to_numpy(x)

        return type(r)(
            float(r.loss),
            {k: back(v) for k, v in r.grads.items()},
            back(r.d_state0),
            back(r.final_state),
            r.peak_cache_bytes,
            r.replayed_chunks,
        )

    mf = build_case(MF["mse-resets-mask-trunc"], 2)
    sb = build_case(SAB["threshold-h0"], 2)
    results = {}
    for be in (BE, tb):
        a = on(be, (mf.params, mf.xs, mf.state0, mf.targets))
        kw = dict(
            config=mf.config,
            loss=mf.loss,
            resets=on(be, mf.resets),
            token_mask=on(be, mf.token_mask),
            truncate_every=mf.truncate_every,
        )
        s = on(be, (sb.params, sb.xs, sb.state0, sb.targets))
        results[be.name] = [
            numpy_result(be, be.mrbp(*a, **kw)),
            numpy_result(be, be.bptt("memformer", *a, **kw)),
            numpy_result(be, be.sab_sparse_replay(*s, config=sb.config, loss=sb.loss)),
            numpy_result(be, be.bptt("sab", *s, config=sb.config, loss=sb.loss)),
        ]
    for label, j, t in zip(
        ("mrbp", "bptt memformer", "sparse replay", "bptt sab"), results["jax"], results["torch"]
    ):
        _agree(j, t, TIGHT, f"jax vs torch {label}")
    assert results["jax"][2].replayed_chunks == results["torch"][2].replayed_chunks


@needs_x64
def test_routing_drivers_compose_with_jit():
    """bptt, mrbp(checkpoint), sab_bptt and sab_sparse_replay run inside jax.jit and agree
    with their eager results; the RoutingResult leaves the jitted function as a pytree."""
    mf = build_case(MF["mse-resets-mask-trunc"], 3)
    params, xs, m0, targets = _args(mf)
    kw = _mf_kw(mf)
    for fn in (
        lambda p, x, m, y: BE.bptt("memformer", p, x, m, y, **kw),
        lambda p, x, m, y: BE.mrbp(p, x, m, y, **kw),
    ):
        eager = fn(params, xs, m0, targets)
        jitted = jax.jit(fn)(params, xs, m0, targets)
        assert isinstance(jitted.loss, jax.Array)
        _agree(jitted, eager, TIGHT, "jit vs eager memformer")
    sab = build_case(SAB["skip-block-xent"], 3)
    params, xs, s0, targets = _args(sab)
    for name in ("sab_bptt", "sab_sparse_replay"):
        def fn(p, x, s, y, name=name):
            return getattr(BE, name)(p, x, s, y, config=sab.config, loss=sab.loss)

        _agree(jax.jit(fn)(params, xs, s0, targets), fn(params, xs, s0, targets), TIGHT, name)
    # jax.grad through a driver's loss (no truncation, whose stop-gradient FD cannot see):
    # d/dscale of L(scale * xs) against a central difference.
    xent = build_case(MF["xent"], 3)
    params, xs, m0, targets = _args(xent)

    def loss_of(scale):
        return BE.bptt("memformer", params, scale * xs, m0, targets, **_mf_kw(xent)).loss

    g = jax.grad(loss_of)(1.0)
    eps = 1e-6
    fd = (loss_of(1.0 + eps) - loss_of(1.0 - eps)) / (2 * eps)
    assert abs(float(g) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))
