"""The cell-generic torch SAB drivers (memcore.backends.torch.sab_model) on LSTM and GRU cells."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch SAB drivers need torch")

from torch.utils._pytree import tree_map

from memcore import MemcoreError, SABConfig
from memcore.backends.torch import cells, sab_model
from memcore.backends.torch.sab_core import flat_state
from memcore.backends.torch.sab_model import chunk_starts, hidden, with_hidden
from memcore.routing_types import Loss

RTOL, ATOL = 1e-10, 1e-12
T, B, I, Hd, A, O = 11, 3, 2, 4, 3, 2


def _params(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    shapes = {"w1": (Hd, A), "w2": (Hd, A), "w3": (A,), "v1": (Hd, O), "v2": (Hd, O), "b_y": (O,)}
    if kind == "lstm":
        shapes.update(lstm_w=(I + Hd, 4 * Hd), lstm_b=(4 * Hd,))
    else:
        shapes.update(gru_wx=(I, 3 * Hd), gru_wh=(Hd, 3 * Hd), gru_bx=(3 * Hd,), gru_bh=(3 * Hd,))
    return {k: torch.tensor(rng.uniform(-0.6, 0.6, s)) for k, s in shapes.items()}


def _inputs(kind: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    xs = torch.tensor(rng.uniform(-1, 1, (T, B, I)))
    targets = torch.tensor(rng.uniform(-1, 1, (T, B, O)))
    h0 = torch.tensor(rng.uniform(-1, 1, (B, Hd)))
    state0 = (h0, torch.tensor(rng.uniform(-1, 1, (B, Hd)))) if kind == "lstm" else h0
    return (cells.lstm if kind == "lstm" else cells.gru), _params(kind, seed), xs, state0, targets


def _naive_loss(cell, p, xs, state, targets, cfg, cuts, weights):
    """The SAB forward written plainly on a growing list of memories (topk's value carries
    the threshold gradient when threshold_grad); (h, state) cut entering the steps in cuts."""
    mems = [hidden(state)] if cfg.include_h0_memory else []
    total = 0.0
    for t in range(1, xs.shape[0] + 1):
        if t in cuts:
            state = tuple(x.detach() for x in state) if isinstance(state, tuple) else state.detach()
        h_hat, state = cell(p, xs[t - 1], state)
        s = torch.zeros_like(h_hat)
        if mems:
            m = torch.stack(mems, 1)
            a = torch.tanh(m @ p["w1"] + (h_hat @ p["w2"])[:, None]) @ p["w3"]
            thr = torch.topk(a, min(cfg.k_top + 1, a.shape[1]), dim=-1).values[:, -1:]
            thr = thr if cfg.threshold_grad else thr.detach()
            z = torch.relu(a - thr)
            s = torch.einsum("bn,bnh->bh", z / (z.sum(-1, keepdim=True) + cfg.eps), m)
        h = h_hat + s
        state = with_hidden(state, h)
        y = h @ p["v1"] + s @ p["v2"] + p["b_y"]
        total = total + weights[t - 1] * ((y - targets[t - 1]) ** 2).mean()
        if t % cfg.k_att == 0:
            mems.append(h)
    return total


def _close(got, want, what):
    """|got - want| <= RTOL * max|want| + ATOL: rounding relative to the gradient's scale
    (memory chains make some entries large, others small)."""
    got, want = got.detach().numpy(), want.detach().numpy()
    err, scale = np.abs(got - want).max(initial=0.0), np.abs(want).max(initial=0.0)
    assert err <= RTOL * scale + ATOL, f"{what}: max abs error {err:.3e}, scale {scale:.3e}"


def _same_result(a, b, what):
    assert abs(a.loss - b.loss) <= RTOL * abs(b.loss) + ATOL, what
    for k in b.grads:
        _close(a.grads[k], b.grads[k], f"{what} grads[{k}]")
    for x, y in zip(flat_state(a.d_state0), flat_state(b.d_state0)):
        _close(x, y, f"{what} d_state0")


CONFIGS = [
    SABConfig(k_top=2, k_att=2, k_trunc=3),
    SABConfig(k_top=1, k_att=2, k_trunc=4, include_h0_memory=True, threshold_grad=True),
    SABConfig(k_top=3, k_att=2, k_trunc=2, block_score_grad=True),
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_replay_equals_sab_bptt_and_naive_truncated_graph(kind, cfg):
    """Sparse replay equals sab_bptt (fast and autograd retrieval), and both equal autograd
    of the plainly written SAB graph with (h, state) cut at the chunk starts (float64)."""
    cell, params, xs, state0, targets = _inputs(kind)
    weights = tuple(float(w) for w in np.linspace(0.5, 1.5, T))
    loss = Loss("mse", weights)
    kw = dict(config=cfg, loss=loss)
    replay = sab_model.sab_sparse_replay(cell, params, xs, state0, targets, **kw)
    whole = sab_model.sab_bptt(cell, params, xs, state0, targets, **kw)
    plain = sab_model.sab_bptt(cell, params, xs, state0, targets, retrieval="autograd", **kw)
    _same_result(replay, whole, "replay vs sab_bptt")
    _same_result(plain, whole, "autograd vs fast retrieval")
    if cfg.block_score_grad:
        return  # the naive graph has no scorer block (test_torch_routing covers it on the LSTM)
    P = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    s0 = tree_map(lambda x: x.clone().requires_grad_(True), state0)
    cuts = set(chunk_starts(T, cfg.k_trunc)) - {1}
    total = _naive_loss(cell, P, xs, s0, targets, cfg, cuts, weights)
    leaves = list(P.values()) + flat_state(s0)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    total_value = float(total.detach())
    assert abs(replay.loss - total_value) <= 1e-10 * abs(total_value)
    for (k, v), g in zip(P.items(), grads):
        _close(replay.grads[k], torch.zeros_like(v) if g is None else g, f"naive grads[{k}]")
    for d, g in zip(flat_state(replay.d_state0), grads[len(P) :]):
        _close(d, g, "naive d_state0")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_untruncated_replay_is_full_bptt(kind):
    """With k_trunc >= T sparse replay is full BPTT: equal to sab_bptt(truncate=False) and to
    autograd of the naive graph (threshold_grad on, so nothing is stopped at all)."""
    cell, params, xs, state0, targets = _inputs(kind, seed=3)
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=T, threshold_grad=True)
    replay = sab_model.sab_sparse_replay(cell, params, xs, state0, targets, config=cfg)
    full = sab_model.sab_bptt(cell, params, xs, state0, targets, config=cfg, truncate=False)
    _same_result(replay, full, "replay vs full BPTT")
    assert replay.replayed_chunks == (0,)
    P = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = _naive_loss(cell, P, xs, state0, targets, cfg, set(), (1.0,) * T)
    for (k, _v), g in zip(P.items(), torch.autograd.grad(total, list(P.values()))):
        _close(full.grads[k], g, f"grads[{k}]")


def test_sab_loss_backward_equals_sab_bptt():
    """.backward() on sab_loss's loss alone gives sab_bptt's gradient (the bank's write
    token is folded into the loss with value 0)."""
    cell, params, xs, state0, targets = _inputs("gru", seed=4)
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=3, include_h0_memory=True)
    P = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    run = sab_model.sab_loss(cell, P, xs, state0, targets, config=cfg)
    run.loss.backward()
    want = sab_model.sab_bptt(cell, params, xs, state0, targets, config=cfg)
    assert float(run.loss.detach()) == want.loss
    for k in P:
        _close(P[k].grad, want.grads[k], k)
    assert run.bank.values.shape == (1 + T // cfg.k_att, B, Hd)


def test_module_cell_equals_functional_gru():
    """An nn.Module cell (nn.GRUCell inside) through module_cell equals the functional gru."""

    class GRU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.GRUCell(I, Hd, dtype=torch.float64)

        def forward(self, x, h):
            h_new = self.inner(x, h)
            return h_new, h_new

    torch.manual_seed(0)
    module = GRU()
    cell, own = cells.module_cell(module)
    _, params, xs, state0, targets = _inputs("gru", seed=5)
    inner = module.inner
    mapped = dict(params)
    mapped.update(
        gru_wx=inner.weight_ih.detach().t(),
        gru_wh=inner.weight_hh.detach().t(),
        gru_bx=inner.bias_ih.detach(),
        gru_bh=inner.bias_hh.detach(),
    )
    rest = {k: v for k, v in params.items() if not k.startswith("gru_")}
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=4)
    got = sab_model.sab_sparse_replay(cell, {**own, **rest}, xs, state0, targets, config=cfg)
    want = sab_model.sab_sparse_replay(cells.gru, mapped, xs, state0, targets, config=cfg)
    assert abs(got.loss - want.loss) <= 1e-12
    _close(got.grads["cell.inner.weight_ih"], want.grads["gru_wx"].t(), "weight_ih")
    _close(got.grads["w1"], want.grads["w1"], "w1")


def test_trunc_phase_moves_the_cuts():
    """trunc_phase p cuts entering t with (t - 1 - p) % k == 0; p = k - 1 is the release's
    schedule (first chunk k - 1 steps), and replay follows it."""
    assert chunk_starts(11, 3) == (1, 4, 7, 10)
    assert chunk_starts(11, 3, 2) == (1, 3, 6, 9)
    assert chunk_starts(5, 8) == (1,)
    cell, params, xs, state0, targets = _inputs("lstm", seed=6)
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=3)
    replay = sab_model.sab_sparse_replay(
        cell, params, xs, state0, targets, config=cfg, trunc_phase=2
    )
    P = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = _naive_loss(cell, P, xs, state0, targets, cfg, {3, 6, 9}, (1.0,) * T)
    for (k, _v), g in zip(P.items(), torch.autograd.grad(total, list(P.values()))):
        _close(replay.grads[k], g, f"grads[{k}]")


def test_cell_driver_errors():
    """Bad input to the cell drivers raises MemcoreError naming the argument."""
    cell, params, xs, state0, targets = _inputs("gru")
    cfg = SABConfig(k_trunc=3)
    with pytest.raises(MemcoreError, match=r"`trunc_phase` must be in \[0, k_trunc\)"):
        sab_model.sab_sparse_replay(cell, params, xs, state0, targets, config=cfg, trunc_phase=3)
    with pytest.raises(MemcoreError, match=r"`config` must be a memcore.SABConfig"):
        sab_model.sab_bptt(cell, params, xs, state0, targets, config=None)
    with pytest.raises(MemcoreError, match="`params` must contain w1"):
        sab_model.sab_loss(cell, {"gru_wx": params["gru_wx"]}, xs, state0, targets, config=cfg)
    with pytest.raises(MemcoreError, match="`state0` hidden must have shape"):
        sab_model.sab_bptt(cell, params, xs, state0[:2], targets, config=cfg)
    with pytest.raises(MemcoreError, match="`retrieval` must be one of fast, autograd"):
        sab_model.sab_bptt(cell, params, xs, state0, targets, config=cfg, retrieval="dense")


# ----------------------------------------------------------------------------- compiled step
def _train_config(method: str, **run):
    from memcore.train.config import parse_config

    memory = method not in ("bptt_lstm", "tbptt")
    data = {
        "task": {"name": "copy", "T": 5, "n_digits": 2, "n_symbols": 3, "transfer_T": [9]},
        "model": {"kind": "sab", "hidden": 5, "k_top": 2, "k_att": 2, "memory": memory,
                  "include_h0_memory": memory, "threshold_grad": method == "bptt"},
        "routing": {"method": "bptt" if method == "bptt_lstm" else method},
        "optim": {"lr": 0.02, "clip_norm": 0.5},
        "run": {"steps": 4, "batch_size": 3, "dtype": "float64", "checkpoint_every": 2,
                "log_every": 2, "eval_size": 4, "eval_batch": 4, "threads": 1, **run},
    }  # fmt: skip
    if method in ("sparse_replay", "sab_bptt", "tbptt"):
        data["routing"]["k_trunc"] = 3
    return parse_config(data)


@pytest.mark.parametrize("method", ["sparse_replay", "sab_bptt", "bptt", "tbptt", "bptt_lstm"])
def test_fast_trainer_equals_generic_trainer(tmp_path, method):
    """memcore train's compiled torch step (run eagerly on the CPU) gives the generic path's
    losses, gradient norms, metrics and parameters in float64 (clipping active)."""
    from memcore.train.trainer import train

    config = _train_config(method)
    fast = train(config, backend="torch", out=str(tmp_path / "fast"), fast=True)
    slow = train(config, backend="torch", out=str(tmp_path / "slow"), fast=False)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(fast["history"][key], slow["history"][key], rtol=1e-10)
    assert any(n > 0.5 for n in slow["history"]["grad_norm"]), "clipping must be exercised"
    assert fast["history"]["step"] == slow["history"]["step"] == [1, 2, 3, 4]
    assert fast["history"]["peak_cache_bytes"] == slow["history"]["peak_cache_bytes"]
    for a, b in zip(fast["history"]["train"], slow["history"]["train"]):
        assert a["step"] == b["step"] and abs(a["ce"] - b["ce"]) < 1e-9
    assert abs(fast["final_eval"]["ce"] - slow["final_eval"]["ce"]) < 1e-9
    assert abs(fast["transfer"]["9"]["ce"] - slow["transfer"]["9"]["ce"]) < 1e-9
    with np.load(tmp_path / "fast" / "checkpoint.npz") as a, np.load(
        tmp_path / "slow" / "checkpoint.npz"
    ) as b:
        for key in a.files:
            if key.startswith(("param/", "adam_")):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-13, err_msg=key)


def test_fast_trainer_resumes_exactly(tmp_path):
    """Stopping the compiled path after 2 steps and resuming gives the uninterrupted run."""
    from memcore.train.trainer import train

    config = _train_config("sparse_replay")
    whole = train(config, backend="torch", out=str(tmp_path / "whole"), fast=True)
    first = train(config, backend="torch", out=str(tmp_path / "split"), fast=True, stop_after=2)
    assert not first["finished"]
    rest = train(config, backend="torch", out=str(tmp_path / "split"), fast=True, resume=True)
    assert rest["history"]["loss"] == whole["history"]["loss"]
    assert rest["final_eval"] == whole["final_eval"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["sparse_replay", "bptt_lstm"])
def test_cuda_graph_step_equals_eager_step(method):
    """The captured CUDA graph step gives the eager step's losses and parameters (float64)."""
    from memcore.train.fast_torch import TrainStep
    from memcore.train.model import init_params
    from memcore.train.optim import adam_init
    from memcore.train.tasks import STREAM_TRAIN, batch_rng, make_batch

    config = _train_config(method)
    params = init_params(config, np.random.default_rng(0))
    runs = {}
    for graph in (False, True):
        opt = adam_init(params)
        step = TrainStep(config, params, opt, dtype="float64", device="cuda", graph=graph)
        losses = []
        for i in range(3):
            batch = make_batch(config.task, batch_rng(0, STREAM_TRAIN, i), 3)
            losses.append(float(step(batch)[0]))
        runs[graph] = (losses, step.snapshot()[0])
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(runs[True][1][k], runs[False][1][k], rtol=1e-9, atol=1e-12)
