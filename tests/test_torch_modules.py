"""The torch nn.Modules: MemoryReader, MemoryWriter and SABCell call the tested ops, and
train_mrbp leaves in .grad exactly the BPTT gradients of the rollout."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="the torch backend needs torch (pip install 'memcore[torch]')"
)

from memcore import MemcoreError, SABConfig
from memcore.backends.torch import (
    MemoryReader,
    MemoryWriter,
    SABCell,
    TorchBackend,
    memformer_params,
    train_mrbp,
)
from memcore.routing_types import Loss

BE = TorchBackend()
F64 = torch.float64
B, L, K, D, H, T = 2, 3, 4, 6, 2, 4


def _modules(seed=0):
    torch.manual_seed(seed)
    return MemoryReader(D, H, dtype=F64), MemoryWriter(K, D, H, tau=0.5, dtype=F64)


def _close(a, b, what, tol=1e-10):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max())
    assert err <= tol * (1.0 + float(b.abs().max())), f"{what}: max abs error {err:.3e}"


def test_reader_and_writer_call_the_ops():
    """Module outputs equal the backend ops on the modules' parameters."""
    reader, writer = _modules()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, L, D, dtype=F64, generator=g)
    m = writer.init_memory(B)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    _close(
        reader(x, m),
        BE.memory_read(x, m, reader.wq, reader.wk, reader.wv, reader.wo, num_heads=H),
        "read",
    )
    want = BE.memory_write(
        m, x, writer.wq, writer.wk, writer.wv, writer.v_bias, num_heads=H, tau=0.5, token_mask=mask
    )
    new = writer(m, x, token_mask=mask)
    _close(new, want, "write")
    assert torch.allclose(new.norm(dim=-1), torch.ones(B, K, dtype=F64))
    flags = torch.tensor([True, False])
    reset = writer.reset(new, flags)
    _close(reset[0], m[0], "reset row")
    _close(reset[1], new[1], "kept row")
    with pytest.raises(MemcoreError, match="`x` must have shape"):
        writer(m[:, :, :-1], x)


@pytest.mark.parametrize("stash", ["device", "host"])
@pytest.mark.parametrize("kind", ["mse", "xent"])
def test_train_mrbp_leaves_bptt_grads(kind, stash):
    """train_mrbp's .grad equals autograd of the whole rollout, including M_0 = init_memory."""
    reader, writer = _modules()
    g = torch.Generator().manual_seed(2)
    xs = torch.rand(T, B, L, D, dtype=F64, generator=g) * 2 - 1
    head = torch.nn.Parameter(torch.rand(D, 3, dtype=F64, generator=g)) if kind == "xent" else None
    if kind == "mse":
        targets = torch.rand(T, B, L, D, dtype=F64, generator=g)
    else:
        targets = torch.randint(0, 3, (T, B, L), generator=g)
    resets = torch.tensor([[False, False], [True, False], [False, False], [False, True]])
    loss = Loss(kind, (1.0, 0.5, 0.0, 2.0))
    result = train_mrbp(
        reader,
        writer,
        xs,
        writer.init_memory(B),
        targets,
        loss=loss,
        resets=resets,
        head=head,
        stash=stash,
    )
    params = memformer_params(reader, writer, head)
    got = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    # Ground truth: one graph from v_bias through init_memory and every step.
    from memcore.backends.torch.routing import _memformer_loss

    total, M_T = _memformer_loss(
        params, xs, writer.init_memory(B), targets, writer.config, loss, resets, None, None
    )
    total.backward()
    value = float(total.detach())
    assert abs(result.loss - value) <= 1e-12 * (1 + abs(value))
    _close(result.memory, M_T.detach(), "M_T")
    for k, p in params.items():
        _close(got[k], p.grad, f"grad {k}")
    assert not result.memory.requires_grad


def test_train_mrbp_accumulates_and_checks():
    """A second rollout adds to .grad like loss.backward(); mismatched modules are rejected."""
    reader, writer = _modules()
    g = torch.Generator().manual_seed(3)
    xs, targets = (
        torch.rand(2, B, L, D, dtype=F64, generator=g),
        torch.rand(2, B, L, D, dtype=F64, generator=g),
    )
    M0 = writer.init_memory(B).detach()
    train_mrbp(reader, writer, xs, M0, targets)
    once = reader.wq.grad.clone()
    train_mrbp(reader, writer, xs, M0, targets)
    _close(reader.wq.grad, 2 * once, "accumulated grad")
    with pytest.raises(MemcoreError, match="`reader` must have the writer's dim and heads"):
        train_mrbp(MemoryReader(D, 3, dtype=F64), writer, xs, M0, targets)
    with pytest.raises(MemcoreError, match="`targets` must have shape"):
        train_mrbp(reader, writer, xs, M0, targets[:1])
    with pytest.raises(MemcoreError, match=r"`stash` must be one of 'device', 'host'.*'gpu'"):
        train_mrbp(reader, writer, xs, M0, targets, stash="gpu")


@pytest.mark.parametrize("include_h0", [False, True])
def test_sab_cell_rollout_equals_sab_bptt(include_h0):
    """Backward through an SABCell rollout (truncate=True) equals the backend's sab_bptt."""
    I, Hd, O, A, steps = 2, 3, 2, 2, 9
    cfg = SABConfig(k_top=2, k_att=2, k_trunc=3, include_h0_memory=include_h0, threshold_grad=True)
    torch.manual_seed(4)
    cell = SABCell(I, Hd, O, A, cfg, dtype=F64)
    g = torch.Generator().manual_seed(5)
    xs, targets = (
        torch.rand(steps, B, I, dtype=F64, generator=g),
        torch.rand(steps, B, O, dtype=F64, generator=g),
    )
    h0 = torch.rand(B, Hd, dtype=F64, generator=g).requires_grad_(True)
    state = cell.initial_state(h0)
    total = 0.0
    for t in range(steps):
        y, state, w = cell(xs[t], state)
        assert w.shape == (B, int(include_h0) + t // 2)
        total = total + ((y - targets[t]) ** 2).mean()
    total.backward()
    want = BE.sab_bptt(
        {k: p.detach() for k, p in cell.params().items()},
        xs,
        (h0.detach(), torch.zeros(B, Hd, dtype=F64)),
        targets,
        config=cfg,
    )
    for k, p in cell.params().items():
        _close(p.grad, want.grads[k], f"grad {k}")
    _close(h0.grad, want.d_state0[0], "dh0")
    assert len(state.memories) == steps // 2 + include_h0
    with pytest.raises(MemcoreError, match=r"`config` must be a memcore.SABConfig"):
        SABCell(I, Hd, O, A, config={"k_top": 2})
