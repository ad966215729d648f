"""The torch routing drivers: MRBP == BPTT, sparse replay == masked-graph BPTT, both equal to
the reference's drivers; chunk skipping, chained rollouts, memory accounting and bad input."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the torch backend needs torch (pip install 'memcore[torch]')"
)

from hypothesis import given

from memcore import MemcoreError, MemoryConfig, SABConfig
from memcore.backends.torch import TorchBackend
from memcore.backends.torch.steps import stack_memories, step_loss
from memcore.conformance.strategies import memformer_cases, sab_cases
from memcore.reference import routing as ref
from memcore.routing_types import Loss

BE = TorchBackend()
OWN = (1e-10, 1e-12)  # (rtol, atol): two torch drivers on the same graph
REF = (1e-9, 1e-12)  # torch against the reference's hand-written drivers (float64)


def _t(x, dtype="float64"):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_t(v, dtype) for v in x)
    return BE.from_numpy(x, dtype=dtype if x.dtype.kind == "f" else None)


def _np(x):
    if isinstance(x, (tuple, list)):
        return tuple(_np(v) for v in x)
    return (
        BE.to_numpy(x).astype(np.float64)
        if isinstance(x, torch.Tensor)
        else np.asarray(x, np.float64)
    )


def _close(got, want, tol, what):
    got, want = np.asarray(_np(got)), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size:
        err = float(np.abs(got - want).max())
        bound = tol[1] + tol[0] * float(np.abs(want).max())
        assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"


def _same(got, want, tol, label=""):
    _close(got.loss, want.loss, tol, f"{label} loss")
    assert set(got.grads) == set(want.grads)
    for k in want.grads:
        _close(got.grads[k], _np(want.grads[k]), tol, f"{label} grads[{k}]")
    for field in ("d_state0", "final_state"):
        g, w = getattr(got, field), getattr(want, field)
        pairs = zip(g, w) if isinstance(w, tuple) else [(g, w)]
        for i, (a, b) in enumerate(pairs):
            _close(a, _np(b), tol, f"{label} {field}[{i}]")


def _memformer_args(case, dtype="float64"):
    kw = dict(
        config=case.config,
        loss=case.loss,
        resets=_t(case.resets),
        token_mask=_t(case.token_mask),
        truncate_every=case.truncate_every,
    )
    params = {k: _t(v, dtype) for k, v in case.params.items()}
    return (params, _t(case.xs, dtype), _t(case.state0, dtype), _t(case.targets, dtype)), kw


def _ref_memformer(case):
    return ref.bptt(
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


@given(case=memformer_cases(max_steps=5))
def test_mrbp_equals_bptt_and_reference(case):
    """Torch MRBP equals torch BPTT (rel 1e-10) and the reference's BPTT (rel 1e-9), float64."""
    args, kw = _memformer_args(case)
    mrbp = BE.mrbp(*args, **kw)
    _same(mrbp, BE.bptt("memformer", *args, **kw), OWN, case.label)
    _same(mrbp, _ref_memformer(case), REF, case.label)


@given(case=memformer_cases(max_steps=3))
def test_mrbp_float32_matches_reference(case):
    """In float32 MRBP and BPTT agree closely and match the float64 reference loosely."""
    args, kw = _memformer_args(case, "float32")
    mrbp = BE.mrbp(*args, **kw)
    assert mrbp.grads["read_wq"].dtype == torch.float32
    _same(mrbp, BE.bptt("memformer", *args, **kw), (1e-5, 1e-6), case.label)
    rounded = attrs.evolve(
        case,
        params={k: _np(v) for k, v in args[0].items()},
        xs=_np(args[1]),
        state0=_np(args[2]),
        targets=_np(args[3]) if case.loss.kind == "mse" else case.targets,
    )
    _same(mrbp, _ref_memformer(rounded), (2e-4, 1e-5), case.label)


def _sab_args(case, dtype="float64"):
    params = {k: _t(v, dtype) for k, v in case.params.items()}
    return (params, _t(case.xs, dtype), _t(case.state0, dtype), _t(case.targets, dtype))


@given(case=sab_cases(max_steps=8))
def test_sparse_replay_equals_sab_bptt_and_reference(case):
    """Sparse replay equals torch sab_bptt and the reference's replay, replaying the same chunks."""
    args = _sab_args(case)
    kw = dict(config=case.config, loss=case.loss)
    replay = BE.sab_sparse_replay(*args, **kw)
    _same(replay, BE.sab_bptt(*args, **kw), OWN, case.label)
    want = ref.sab_sparse_replay(case.params, case.xs, case.state0, case.targets, **kw)
    _same(replay, want, REF, case.label)
    assert sorted(replay.replayed_chunks) == sorted(want.replayed_chunks)
    assert list(replay.replayed_chunks) == sorted(replay.replayed_chunks, reverse=True)
    full = BE.bptt("sab", *args, **kw)
    _same(
        full,
        ref.bptt("sab", case.params, case.xs, case.state0, case.targets, **kw),
        REF,
        case.label,
    )


def _plain_sab_loss(p, xs, h, c, targets, cfg, loss):
    """SAB's forward written naively: topk's value carries the threshold gradient."""
    memories = [h] if cfg.include_h0_memory else []
    total = 0.0
    for t in range(1, xs.shape[0] + 1):
        z = torch.cat([xs[t - 1], h], -1) @ p["lstm_w"] + p["lstm_b"]
        i, f, g, o = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_hat = torch.sigmoid(o) * torch.tanh(c)
        mem = stack_memories(memories, h_hat)
        s = torch.zeros_like(h_hat)
        if mem.shape[1]:
            a = torch.tanh(mem @ p["w1"] + (h_hat @ p["w2"])[:, None]) @ p["w3"]
            thr = torch.topk(a, min(cfg.k_top + 1, a.shape[1]), dim=-1).values[:, -1:]
            zz = torch.relu(a - thr)
            w = zz / (zz.sum(-1, keepdim=True) + cfg.eps)
            s = torch.einsum("bn,bnh->bh", w, mem)
        h = h_hat + s
        y = h @ p["v1"] + s @ p["v2"] + p["b_y"]
        weight = 1.0 if loss.weights is None else loss.weights[t - 1]
        total = total + weight * step_loss(y, targets[t - 1], loss.kind, p)
        if t % cfg.k_att == 0:
            memories.append(h)
    return total


@given(case=sab_cases(max_steps=6))
def test_untruncated_replay_is_plain_autograd(case):
    """With k_trunc >= T and threshold_grad, sparse replay is plain autograd of a naive forward."""
    T = case.xs.shape[0]
    cfg = attrs.evolve(case.config, k_trunc=T, threshold_grad=True, block_score_grad=False)
    params, xs, state0, targets = _sab_args(case)
    replay = BE.sab_sparse_replay(params, xs, state0, targets, config=cfg, loss=case.loss)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    h0, c0 = (s.clone().requires_grad_(True) for s in state0)
    total = _plain_sab_loss(leaves, xs, h0, c0, targets, cfg, case.loss)
    grads = torch.autograd.grad(total, list(leaves.values()) + [h0, c0], allow_unused=True)
    for k, g in zip(leaves, grads):
        _close(
            replay.grads[k],
            _np(torch.zeros_like(leaves[k]) if g is None else g),
            OWN,
            f"grads[{k}]",
        )
    _close(replay.d_state0[0], _np(grads[-2]), OWN, "dh0")
    assert replay.replayed_chunks in ((), (0,))


def test_skipped_chunks_receive_no_gradient():
    """Chunks the replay skips get exactly zero gradient in the whole masked graph; others don't."""
    rng = np.random.default_rng(4)
    T, B, I, Hd, A, O = 12, 2, 2, 3, 2, 2
    cfg = SABConfig(k_top=1, k_att=2, k_trunc=3)
    params = {
        k: torch.tensor(rng.uniform(-1, 1, s))
        for k, s in {
            "lstm_w": (I + Hd, 4 * Hd),
            "lstm_b": (4 * Hd,),
            "w1": (Hd, A),
            "w2": (Hd, A),
            "w3": (A,),
            "v1": (Hd, O),
            "v2": (Hd, O),
            "b_y": (O,),
        }.items()
    }
    xs, targets = (
        torch.tensor(rng.uniform(-1, 1, (T, B, I))),
        torch.tensor(rng.uniform(-1, 1, (T, B, O))),
    )
    state0 = (torch.tensor(rng.uniform(-1, 1, (B, Hd))), torch.zeros(B, Hd, dtype=torch.float64))
    loss = Loss("mse", (0.0,) * (T - 1) + (1.0,))  # only the last step counts
    replay = BE.sab_sparse_replay(params, xs, state0, targets, config=cfg, loss=loss)
    # Per-chunk gradient in the masked graph: retain the grad of every step's h and c.
    from memcore.backends.torch.steps import sab_step

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    h, c = state0
    memories, per_step = [], []
    total = 0.0
    for t in range(1, T + 1):
        if t > 1 and (t - 1) % cfg.k_trunc == 0:
            h, c = h.detach(), c.detach()
        h, c, y, _ = sab_step(p, xs[t - 1], h, c, stack_memories(memories, h), config=cfg)
        h.retain_grad(), c.retain_grad()
        per_step.append((h, c))
        total = total + loss.weights[t - 1] * step_loss(y, targets[t - 1], "mse", p)
        if t % cfg.k_att == 0:
            memories.append(h)
    total.backward()
    chunks = T // cfg.k_trunc
    got_grad = [
        any(
            bool((s.grad != 0).any())
            for pair in per_step[m * 3 : (m + 1) * 3]
            for s in pair
            if s.grad is not None
        )
        for m in range(chunks)
    ]
    assert set(replay.replayed_chunks) == {m for m in range(chunks) if got_grad[m]}
    assert len(replay.replayed_chunks) < chunks, "this case must skip at least one chunk"
    _same(replay, BE.sab_bptt(params, xs, state0, targets, config=cfg, loss=loss), OWN)


def test_chained_rollouts_match_truncated_bptt():
    """Two chained MRBP rollouts sum to one long BPTT truncated at the rollout boundary."""
    rng = np.random.default_rng(2)
    k, B, L, K, D = 3, 2, 3, 2, 4
    cfg = MemoryConfig(slots=K, dim=D, heads=2, tau=0.5)
    names = ("read_wq", "read_wk", "read_wv", "read_wo", "write_wq", "write_wk", "write_wv")
    params = {n: torch.tensor(rng.uniform(-0.8, 0.8, (D, D))) for n in names}
    params["v_bias"] = torch.tensor(rng.uniform(-1, 1, (K, D)))
    xs, targets = (
        torch.tensor(rng.uniform(-1, 1, (2 * k, B, L, D))),
        torch.tensor(rng.uniform(-1, 1, (2 * k, B, L, D))),
    )
    M0 = torch.nn.functional.normalize(torch.tensor(rng.uniform(-1, 1, (B, K, D))), dim=-1)
    first = BE.mrbp(params, xs[:k], M0, targets[:k], config=cfg)
    second = BE.mrbp(params, xs[k:], first.final_state, targets[k:], config=cfg)
    long = BE.bptt("memformer", params, xs, M0, targets, config=cfg, truncate_every=k)
    _close(first.loss + second.loss, long.loss, OWN, "loss")
    for n in params:
        _close(first.grads[n] + second.grads[n], _np(long.grads[n]), OWN, n)
    _close(second.final_state, _np(long.final_state), OWN, "M_T")
    _close(first.d_state0, _np(long.d_state0), OWN, "dM_0")


def _memformer_inputs(T, B=2, L=3, K=4, D=4, seed=0):
    rng = np.random.default_rng(seed)
    names = ("read_wq", "read_wk", "read_wv", "read_wo", "write_wq", "write_wk", "write_wv")
    params = {n: torch.tensor(rng.uniform(-0.8, 0.8, (D, D))) for n in names}
    params["v_bias"] = torch.tensor(rng.uniform(-1, 1, (K, D)))
    xs, targets = (
        torch.tensor(rng.uniform(-1, 1, (T, B, L, D))),
        torch.tensor(rng.uniform(-1, 1, (T, B, L, D))),
    )
    M0 = torch.nn.functional.normalize(torch.tensor(rng.uniform(-1, 1, (B, K, D))), dim=-1)
    return params, xs, M0, targets, MemoryConfig(slots=K, dim=D, heads=2)


def test_peak_cache_bytes_growth():
    """Doubling T doubles BPTT's saved bytes but adds only T*B*K*D*itemsize to MRBP's."""
    T, B, K, D = 4, 2, 4, 4
    small, large = _memformer_inputs(T), _memformer_inputs(2 * T)
    bptt = [BE.bptt("memformer", *a[:4], config=a[4]).peak_cache_bytes for a in (small, large)]
    mrbp = [BE.mrbp(*a[:4], config=a[4]).peak_cache_bytes for a in (small, large)]
    assert abs(bptt[1] / bptt[0] - 2.0) < 0.05, bptt
    assert mrbp[1] - mrbp[0] == T * B * K * D * 8, mrbp
    assert mrbp[1] < bptt[1] / 2


def test_sparse_replay_holds_less_than_sab_bptt():
    """Sparse replay's peak is the stored states plus one chunk, well under the whole graph's."""
    rng = np.random.default_rng(1)
    T, B, I, Hd, A, O = 40, 2, 3, 8, 4, 2
    shapes = {
        "lstm_w": (I + Hd, 4 * Hd),
        "lstm_b": (4 * Hd,),
        "w1": (Hd, A),
        "w2": (Hd, A),
        "w3": (A,),
        "v1": (Hd, O),
        "v2": (Hd, O),
        "b_y": (O,),
    }
    params = {k: torch.tensor(rng.uniform(-1, 1, s)) for k, s in shapes.items()}
    xs, targets = (
        torch.tensor(rng.uniform(-1, 1, (T, B, I))),
        torch.tensor(rng.uniform(-1, 1, (T, B, O))),
    )
    state0 = (torch.zeros(B, Hd, dtype=torch.float64), torch.zeros(B, Hd, dtype=torch.float64))
    cfg = SABConfig(k_top=2, k_att=4, k_trunc=5)
    replay = BE.sab_sparse_replay(params, xs, state0, targets, config=cfg)
    whole = BE.sab_bptt(params, xs, state0, targets, config=cfg)
    stored = (T // cfg.k_trunc * 2 + T // cfg.k_att) * B * Hd * 8
    assert stored < replay.peak_cache_bytes < whole.peak_cache_bytes / 3


def _sab_inputs(T, cfg, *, B=2, I=2, Hd=3, A=2, O=2, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = {
        "lstm_w": (I + Hd, 4 * Hd),
        "lstm_b": (4 * Hd,),
        "w1": (Hd, A),
        "w2": (Hd, A),
        "w3": (A,),
        "v1": (Hd, O),
        "v2": (Hd, O),
        "b_y": (O,),
    }
    params = {k: torch.tensor(rng.uniform(-1, 1, s)) for k, s in shapes.items()}
    params["w3"] = params["w3"] * scale  # scale 0: every score is 0, all memories tie
    xs, targets = (
        torch.tensor(rng.uniform(-1, 1, (T, B, I))),
        torch.tensor(rng.uniform(-1, 1, (T, B, O))),
    )
    state0 = (torch.tensor(rng.uniform(-1, 1, (B, Hd))), torch.tensor(rng.uniform(-1, 1, (B, Hd))))
    return params, xs, state0, targets


FAST_CASES = [
    (SABConfig(k_top=2, k_att=2, k_trunc=3), 1.0, None),
    (SABConfig(k_top=1, k_att=1, k_trunc=4, include_h0_memory=True), 1.0, None),
    (SABConfig(k_top=3, k_att=1, k_trunc=2, threshold_grad=True), 1.0, None),
    (
        SABConfig(k_top=2, k_att=1, k_trunc=5, threshold_grad=True, include_h0_memory=True),
        0.0,
        None,
    ),
    (SABConfig(k_top=2, k_att=2, k_trunc=3, block_score_grad=True, threshold_grad=True), 1.0, None),
    (SABConfig(k_top=8, k_att=1, k_trunc=3, eps=0.0), 1.0, None),  # N <= k_top throughout
    (SABConfig(k_top=2, k_att=1, k_trunc=2, eps=0.0), 0.0, None),  # ties, zero normalizer
    (SABConfig(k_top=1, k_att=2, k_trunc=3), 1.0, (0.0,) * 9 + (1.0, 0.0, 0.0)),  # skips
]


@pytest.mark.parametrize("cfg,scale,weights", FAST_CASES)
def test_fast_retrieval_equals_plain_autograd(cfg, scale, weights):
    """The drivers' memory-bank retrieval (hand-written backward) equals the plain autograd op
    on stacked memories to float64 round-off, for bptt, sab_bptt and sparse replay."""
    args = _sab_inputs(12, cfg, scale=scale, seed=3)
    kw = dict(config=cfg, loss=Loss("mse", weights))
    for name in ("sab_sparse_replay", "sab_bptt", "bptt"):
        run = getattr(BE, name) if name != "bptt" else (lambda *a, **k: BE.bptt("sab", *a, **k))
        fast, plain = run(*args, **kw), run(*args, retrieval="autograd", **kw)
        _same(fast, plain, OWN, f"{name} {cfg}")
        assert fast.replayed_chunks == plain.replayed_chunks
        if scale != 0.0:  # the scorer is exercised: its weights get gradient
            assert bool((fast.grads["w1"] != 0).any()), name
    with pytest.raises(MemcoreError, match="`retrieval` must be one of fast, autograd"):
        BE.sab_sparse_replay(*args, retrieval="dense", **kw)


@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("block_score_grad", [False, True])
@pytest.mark.parametrize("k_top", [1, 2, 6])
def test_bank_retrieve_backward_with_ties(threshold_grad, block_score_grad, k_top):
    """bank_retrieve's hand-written backward equals autograd of sparse_retrieve when duplicated
    memories tie at and around the threshold (the equal-split rule), bank gradient included."""
    from memcore.backends.torch.sab import bank_retrieve, sparse_retrieve
    from memcore.backends.torch.steps import SABMemories

    rng = np.random.default_rng(k_top)
    B, N, Hd, A = 3, 6, 4, 3
    rows = torch.tensor(rng.uniform(-1, 1, (B, 3, Hd)))
    memories = rows[:, [0, 1, 1, 2, 2, 2]]  # scores tie in pairs and triples
    w1, w2, w3, h_hat = (
        torch.tensor(rng.uniform(-1, 1, s)) for s in ((Hd, A), (Hd, A), (A,), (B, Hd))
    )
    ds = torch.tensor(rng.uniform(-1, 1, (B, Hd)))
    cfg = SABConfig(k_top=k_top, threshold_grad=threshold_grad, block_score_grad=block_score_grad)
    leaves = [v.clone().requires_grad_(True) for v in (h_hat, memories, w1, w2, w3)]
    s, _ = sparse_retrieve(
        *leaves, k_top=k_top, threshold_grad=threshold_grad, block_score_grad=block_score_grad
    )
    want = torch.autograd.grad(s, leaves, ds, allow_unused=True)
    mem = SABMemories(N, h_hat)
    mem.values.copy_(memories.transpose(0, 1))
    mem.track()
    fast_leaves = [v.clone().requires_grad_(True) for v in (h_hat, w1, w2, w3)]
    s_fast = bank_retrieve(mem, N, *fast_leaves, None, cfg)
    _close(s_fast, _np(s), OWN, "s")
    got = torch.autograd.grad(s_fast, fast_leaves, ds, allow_unused=True)
    got = [got[0], mem.grad.transpose(0, 1), *got[1:]]
    for name, g, w in zip(("h_hat", "memories", "w1", "w2", "w3"), got, want):
        if w is None or g is None:
            assert (w is None or not bool(w.any())) and (g is None or not bool(g.any())), name
        else:
            _close(g, _np(w), OWN, name)


def test_sparse_replay_peak_grows_by_stored_state_only():
    """Doubling T adds exactly the new memories and boundary c's to sparse replay's peak (a
    chunk's saved tensors do not grow with N); the plain stacked retrieval adds more."""
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=4)  # every boundary h after chunk 0 is a memory
    B, Hd, T = 2, 3, 16
    peaks = {}
    for retrieval in ("fast", "autograd"):
        peaks[retrieval] = [
            BE.sab_sparse_replay(
                *_sab_inputs(steps, cfg, B=B, Hd=Hd), config=cfg, retrieval=retrieval
            ).peak_cache_bytes
            for steps in (T, 2 * T)
        ]
    added = (T // cfg.k_att + T // cfg.k_trunc) * B * Hd * 8
    assert peaks["fast"][1] - peaks["fast"][0] == added, peaks
    assert peaks["autograd"][1] - peaks["autograd"][0] > added, peaks


def test_routing_errors():
    """Bad routing input raises MemcoreError naming the argument."""
    params, xs, M0, targets, cfg = _memformer_inputs(3)
    bad = [
        (dict(xs=xs[:0], targets=targets[:0]), r"`xs` must have T >= 1"),
        (dict(targets=targets[:2]), r"`targets` must have shape"),
        (dict(M0=M0[:, :, :3]), r"`M0` must have shape"),  # `state0` in bptt: its name there
        (dict(resets=torch.zeros(2, 2, dtype=torch.bool)), r"`resets` must have shape"),
        (dict(resets=torch.zeros(3, 2)), r"`resets` must have dtype bool"),
        (dict(token_mask=torch.ones(3, 2, 2, dtype=torch.bool)), r"`token_mask` must have shape"),
        (dict(loss=Loss(weights=(1.0, 2.0))), r"`loss.weights` must have one weight per step"),
        (dict(truncate_every=0), r"`truncate_every` must be None or an integer >= 1"),
        (
            dict(params={k: v for k, v in params.items() if k != "v_bias"}),
            r"`params` must contain .*v_bias.*Received: missing \['v_bias'\]",
        ),
        (dict(loss=Loss("xent")), r"`params` must contain head_w.*missing \['head_w'\]"),
        (dict(xs=xs.numpy()), r"`xs` must be a torch.Tensor. Received: xs=ndarray"),
        (dict(xs=xs.clone().index_fill_(0, torch.tensor([1]), float("nan"))),
         r"`xs` must be finite"),
        (dict(config=SABConfig()), r"`config` must be a memcore.MemoryConfig"),
    ]
    base = dict(params=params, xs=xs, M0=M0, targets=targets, config=cfg)
    for change, match in bad:
        kw = {**base, **change}
        args = (kw.pop("params"), kw.pop("xs"), kw.pop("M0"), kw.pop("targets"))
        with pytest.raises(MemcoreError, match=match):
            BE.mrbp(*args, **kw)
        with pytest.raises(MemcoreError, match=match.replace("`M0`", "`state0`")):
            BE.bptt("memformer", *args, **kw)
    with pytest.raises(MemcoreError, match="`step` must be one of"):
        BE.bptt("lstm", params, xs, M0, targets, config=cfg)
    h = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(MemcoreError, match="`resets` must be None for step 'sab'"):
        BE.bptt(
            "sab",
            {},
            torch.zeros(2, 2, 1, dtype=torch.float64),
            (h, h),
            None,
            config=SABConfig(),
            resets=torch.zeros(2, 2, dtype=torch.bool),
        )
    sab_params, sab_xs, (h0, c0), sab_targets = _sab_inputs(4, SABConfig())
    with pytest.raises(MemcoreError, match=r"`state0\[1\]` must have shape"):
        BE.sab_sparse_replay(sab_params, sab_xs, (h0, c0[:, :2]), sab_targets, config=SABConfig())


def test_routing_leaves_inputs_untouched():
    """The drivers neither modify the caller's tensors nor leave gradients on them."""
    params, xs, M0, targets, cfg = _memformer_inputs(3)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    BE.mrbp(params, xs, M0, targets, config=cfg)
    BE.bptt("memformer", params, xs, M0, targets, config=cfg)
    for k, v in params.items():
        assert v.grad is None and torch.equal(v.detach(), before[k])
