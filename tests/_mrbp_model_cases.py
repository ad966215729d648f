"""A small user model for the model-agnostic MRBP tests: two memory modules in series.

Shared by tests/test_torch_mrbp_model.py (CPU, float64) and its CUDA companion.
"""

from __future__ import annotations

import torch
from torch import nn

from memcore.backends.torch import MemoryReader, MemoryWriter
from memcore.backends.torch.mrbp_model import recompute

B, L, K, D, H, T = 2, 3, 4, 6, 2, 5


class Block(nn.Module):
    """Read memory, add, and write it: one memory module (x: (B, L, D), memory: (B, K, D))."""

    def __init__(self, dtype, device=None) -> None:
        super().__init__()
        self.reader = MemoryReader(D, H, dtype=dtype, device=device)
        self.writer = MemoryWriter(K, D, H, tau=0.5, dtype=dtype, device=device)
        self.ffn = nn.Linear(D, D, dtype=dtype, device=device)

    def forward(self, x, memory):
        """(x', memory') for x (B, L, D), memory (B, K, D)."""
        x = x + self.reader(x, memory)
        x = x + torch.tanh(self.ffn(x))
        return x, self.writer(memory, x)


class Stacked(nn.Module):
    """Two memory blocks in series, memory {"a": (B, K, D), "b": (B, K, D)}, mse head.

    Args:
        mark: wrap block "a" in :func:`recompute` (the user-marked block).
    """

    def __init__(self, dtype=torch.float64, device=None, mark: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D, dtype=dtype, device=device)
        self.a, self.b = Block(dtype, device), Block(dtype, device)
        self.head = nn.Linear(D, 1, dtype=dtype, device=device)
        self.mark = mark

    def init_memory(self, batch: int):
        """{"a", "b"}: M_0 from each writer's v_bias, differentiable."""
        return {"a": self.a.writer.init_memory(batch), "b": self.b.writer.init_memory(batch)}

    def _memories(self, memory, segment):
        x = torch.tanh(self.inp(segment["x"]))
        if self.mark:
            x, a = recompute(self.a, x, memory["a"])
        else:
            x, a = self.a(x, memory["a"])
        x, b = self.b(x, memory["b"])
        return x, {"a": a, "b": b}

    def forward(self, memory, segment):
        """(mean squared error of the head, next memory) for one segment {"x", "y"}."""
        x, nxt = self._memories(memory, segment)
        return ((self.head(x).squeeze(-1) - segment["y"]) ** 2).mean(), nxt

    def advance(self, memory, segment):
        """The memory path alone (no head, no loss)."""
        return self._memories(memory, segment)[1]


def data(seed: int = 0, dtype=torch.float64, device=None, batch: int = B, steps: int = T):
    """Stacked segments {"x": (T, B, L, D), "y": (T, B, L)}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, L, D, generator=g, dtype=dtype)
    y = torch.randn(steps, batch, L, generator=g, dtype=dtype)
    return {"x": x.to(device), "y": y.to(device)}


def windows(T_: int, truncate_every=None, horizon=None):
    """First segment loss_t back-propagates to (docs/semantics.md, MRBP over a user step)."""
    out = []
    for t in range(T_):
        start = 0 if truncate_every is None else (t // truncate_every) * truncate_every
        if horizon is not None:
            start = max(start, t - horizon + 1)
        out.append(start)
    return out


def bptt(model, memory0, segs, *, truncate_every=None, horizon=None, loss_scale=1.0):
    """Plain autograd ground truth: each loss_t through its window; .grad accumulated.

    Returns (L, M_T). Loss t runs from M_start detached (start > 0) or memory0 (start 0).
    """
    steps = segs["x"].shape[0]
    seg = [{"x": segs["x"][t], "y": segs["y"][t]} for t in range(steps)]
    with torch.no_grad():  # the memories M_0..M_T without graph
        mems = [memory0]
        for t in range(steps):
            mems.append(model(mems[-1], seg[t])[1])
    if horizon is None:  # one chain, detached at the cuts
        m, acc = memory0, 0.0
        for t, start in enumerate(windows(steps, truncate_every)):
            if start == t and t > 0:
                m = {k: v.detach() for k, v in m.items()}
            loss, m = model(m, seg[t])
            acc = acc + loss
        (acc * loss_scale).backward()
        return float(acc.detach()) * loss_scale, mems[-1]
    total = 0.0
    for t, start in enumerate(windows(steps, truncate_every, horizon)):
        m = memory0 if start == 0 else {k: v.detach() for k, v in mems[start].items()}
        for s in range(start, t + 1):
            loss, m = model(m, seg[s])
        (loss * loss_scale).backward(retain_graph=True)  # memory0's graph is shared
        total += float(loss.detach()) * loss_scale
    return total, mems[-1]


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of every parameter's .grad (zeros where None), then .grad cleared."""
    out = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-10) -> None:
    """Every entry within tol relative to the largest |want| (and not all zero)."""
    assert any(float(w.abs().max()) > 0 for w in want.values())
    for k in want:
        err = float((got[k] - want[k]).abs().max())
        assert err <= tol * (1.0 + float(want[k].abs().max())), f"{k}: max abs error {err:.3e}"


def ddp_worker(rank: int, world: int, init_file: str, out_path: str) -> None:
    """One gloo rank: two MRBP rollouts of a DDP-wrapped Stacked on its half of a batch of 4.

    Rank 0 saves its .grad and, per rollout, the bucket indices its comm hook saw.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from memcore.backends.torch.mrbp_model import mrbp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Stacked()
        ddp = DistributedDataParallel(model)
        calls: list[int] = []

        def hook(state, bucket):
            state.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(calls, hook)
        segs = data(10, batch=2 * world)
        rows = slice(2 * rank, 2 * rank + 2)
        local = {k: v[:, rows] for k, v in segs.items()}
        per_rollout = []
        for _ in range(2):
            before = len(calls)
            mrbp(ddp, model.init_memory(2), local)  # the DDP step is detected as ddp
            per_rollout.append(calls[before:])
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            torch.save({"grads": grads, "calls": per_rollout}, out_path)
        dist.barrier()  # no rank tears gloo down while the other is still at work
    finally:
        dist.destroy_process_group()
