"""Gradient routing of the Memformer-lite LM over T segments: BPTT, checkpointing, MRBP.

Each method computes L = (1/T) sum_t l_t (l_t: segment t's mean cross-entropy) from
M_0 = model.init_memory(B) and leaves dL/dparam in the parameters' ``.grad`` (accumulated,
like ``loss.backward()``). All return L as a 0-d tensor (no host sync).

- :func:`bptt`: the whole T-segment graph, one backward.
- :func:`checkpointed`: ``torch.utils.checkpoint`` around every segment (non-reentrant):
  only each segment's inputs are saved, the segment is recomputed during backward.
- :func:`mrbp`: Memformer Alg. 1 at the LM level: a no-grad forward that runs only
  the memory path (``model.advance``: no head, no loss) and keeps M_0..M_T; then for
  t = T-1..0, segment t is recomputed from M_t and back-propagated with (1/T, dM_{t+1}).
  This is memcore's ``routing.mrbp_accumulate`` pattern; memcore's ``train_mrbp`` drives a
  bare read -> write cell with a per-token loss, so it cannot take a whole LM segment.
- :class:`GraphedMRBP`: the same algorithm with the two per-segment programs (no-grad
  advance; recompute + backward) captured once as CUDA graphs and replayed: every segment
  has the same shapes, so MRBP needs just two graphs whatever T is (CUDA only).
- :class:`GraphedBPTT`: the whole BPTT iteration captured as one CUDA graph (CUDA only),
  the fair baseline for :class:`GraphedMRBP`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memcore.backends.torch.stash import MemoryStash

from bench.lm_model import MemformerLM

__all__ = ["METHODS", "GraphedBPTT", "GraphedMRBP", "bptt", "checkpointed", "mrbp"]


def _amp(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def bptt(model: MemformerLM, tokens: torch.Tensor, targets: torch.Tensor, amp=None):
    """Full BPTT. tokens, targets: (T, B, L) ids."""
    T, B = tokens.shape[:2]
    with _amp(tokens.device, amp):
        M = model.init_memory(B)
        total = 0.0
        for t in range(T):
            l_t, M = model.segment_loss(tokens[t], targets[t], M)
            total = total + l_t
        total = total / T
    total.backward()
    return total.detach()


def checkpointed(model: MemformerLM, tokens: torch.Tensor, targets: torch.Tensor, amp=None):
    """BPTT with ``torch.utils.checkpoint`` per segment (non-reentrant)."""
    T, B = tokens.shape[:2]
    with _amp(tokens.device, amp):
        M = model.init_memory(B)
        total = 0.0
        for t in range(T):
            l_t, M = checkpoint(model.segment_loss, tokens[t], targets[t], M, use_reentrant=False)
            total = total + l_t
        total = total / T
    total.backward()
    return total.detach()


def mrbp(
    model: MemformerLM,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    amp=None,
    *,
    stash: str = "device",
    recompute: bool = False,
):
    """MRBP (Memformer Alg. 1): memories-only forward, then per-segment recompute + VJP.

    ``stash``: where M_0..M_{T-1} wait for the backward (:class:`MemoryStash`: "device",
    or "host" to offload them); ``recompute``: per-block recomputation inside the replayed
    segment (:meth:`MemformerLM.segment_loss`).
    """
    T, B = tokens.shape[:2]
    dev = tokens.device
    with _amp(dev, amp):
        M0 = model.init_memory(B)  # its graph reaches v_bias; dM_0 is sent through it last
    memories = MemoryStash(stash)
    M = M0.detach()
    with torch.no_grad(), _amp(dev, amp):
        for t in range(T):
            memories.push(M)
            M = model.advance(tokens[t], M)
    del M  # M_T does not reach the loss
    total = torch.zeros((), device=dev)
    d_memory = None
    for t in reversed(range(T)):
        M_in = memories.pop().requires_grad_(True)
        with _amp(dev, amp):
            l_t, M_next = model.segment_loss(tokens[t], targets[t], M_in, recompute)
            l_t = l_t / T
        if d_memory is None:
            l_t.backward()  # M_T does not reach the loss
        else:
            torch.autograd.backward([l_t, M_next], [torch.ones_like(l_t), d_memory])
        total += l_t.detach()
        d_memory = M_in.grad
    M0.backward(d_memory)
    return total


_CAPTURE_STREAMS: dict[torch.device, Any] = {}


class _Graphed:
    """Shared parts of the CUDA-graph runners: gradient buffers, warm-up, capture.

    The graphs accumulate straight into the parameters' ``.grad`` tensors (captured by
    address), exactly like ``loss.backward()`` accumulates: no second set of gradient
    buffers. So ``.grad`` must exist before capture and must be zeroed in place
    (``zero_grad(set_to_none=False)``), never replaced; a call checks that.
    """

    def __init__(self, model: MemformerLM, amp: torch.dtype | None) -> None:
        self.model, self.amp = model, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.acc = [p.grad for p in self.params]
        self.loss_acc = torch.zeros((), device=self.params[0].device)

    def _ctx(self) -> Any:
        # The autocast weight cache must be off inside a capture (its casts must be replayed).
        return _amp(self.params[0].device, self.amp, cache=False)

    def _accumulate(self, grads) -> None:
        for a, g in zip(self.acc, grads):
            if g is not None:
                a.add_(g)

    def _capture(self, fn: Callable[[], Any], pool: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
        # One capture stream per device for the whole process: cuBLAS keeps a workspace
        # per stream for the life of the process, which a fresh stream per capture would
        # leave behind in every later measurement.
        dev = self.params[0].device
        stream = _CAPTURE_STREAMS.setdefault(dev, torch.cuda.Stream(device=dev))
        stream.wait_stream(torch.cuda.current_stream())
        saved = [a.clone() for a in self.acc]  # warm-up and capture add into .grad
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up off the default stream (cuBLAS handles, autotuning)
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        for a, s in zip(self.acc, saved):
            a.copy_(s)
        return graph, out

    def _check_grads(self) -> None:
        for p, a in zip(self.params, self.acc):
            if p.grad is not a:
                raise RuntimeError(
                    "a parameter's .grad was replaced after the CUDA graphs were captured "
                    "(they add into the captured tensors): zero gradients with "
                    "zero_grad(set_to_none=False)"
                )


class GraphedMRBP(_Graphed):
    """MRBP with the advance step and the recompute + backward step as CUDA graphs.

    Args:
        model: the LM (its parameters on a CUDA device); batch: B; seq: L; amp: autocast
        dtype or None; stash, recompute: as in :func:`mrbp`.
    """

    def __init__(
        self,
        model: MemformerLM,
        batch: int,
        seq: int,
        amp=None,
        *,
        stash: str = "device",
        recompute: bool = False,
    ) -> None:
        super().__init__(model, amp)
        self.stash, self.recompute = stash, recompute
        dev = self.params[0].device
        K, D = model.writer.v_bias.shape
        self.tok = torch.randint(0, 2, (batch, seq), device=dev)
        self.tgt = torch.randint(0, 2, (batch, seq), device=dev)
        # One static memory buffer serves both graphs (the advance reads it without grad).
        self.M_leaf = torch.randn(batch, K, D, device=dev, requires_grad=True)
        self.dM = torch.randn(batch, K, D, device=dev)
        self.weight = torch.ones((), device=dev)
        pool = torch.cuda.graph_pool_handle()
        self.g_adv, self.M_out = self._capture(self._advance, pool)
        self.g_bwd, self.dM_out = self._capture(self._backward, pool)

    def _advance(self) -> torch.Tensor:
        with torch.no_grad(), self._ctx():
            return self.model.advance(self.tok, self.M_leaf)

    def _backward(self) -> torch.Tensor:
        with torch.enable_grad(), self._ctx():
            l_t, M_next = self.model.segment_loss(self.tok, self.tgt, self.M_leaf, self.recompute)
            l_t = l_t * self.weight
        grads = torch.autograd.grad(
            [l_t, M_next],
            self.params + [self.M_leaf],
            [torch.ones_like(l_t), self.dM],
            allow_unused=True,
        )
        self._accumulate(grads[:-1])
        self.loss_acc.add_(l_t.detach())
        return grads[-1]

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One MRBP iteration over tokens, targets (T, B, L); grads land in ``.grad``."""
        T, B = tokens.shape[:2]
        self._check_grads()
        self.loss_acc.zero_()
        self.weight.fill_(1.0 / T)
        with _amp(tokens.device, self.amp):
            M0 = self.model.init_memory(B)
        memories = MemoryStash(self.stash)
        memories.push(M0.detach())
        with torch.no_grad():
            self.M_leaf.copy_(M0.detach())
            for t in range(T):
                self.tok.copy_(tokens[t])
                self.g_adv.replay()
                if t < T - 1:  # M_T does not reach the loss
                    memories.push(self.M_out.clone())  # M_out is the graph's buffer: a copy
                    self.M_leaf.copy_(self.M_out)
        self.dM.zero_()
        for t in reversed(range(T)):
            self.tok.copy_(tokens[t])
            self.tgt.copy_(targets[t])
            with torch.no_grad():
                self.M_leaf.copy_(memories.pop())
            self.g_bwd.replay()
            self.dM.copy_(self.dM_out)
        M0.backward(self.dM)
        return self.loss_acc.clone()


class GraphedBPTT(_Graphed):
    """The whole BPTT iteration (forward and backward over T segments) as one CUDA graph.

    Args:
        model: the LM on a CUDA device; tokens, targets: (T, B, L), fixing T at capture.
    """

    def __init__(self, model: MemformerLM, tokens: torch.Tensor, targets: torch.Tensor, amp=None):
        super().__init__(model, amp)
        self.tok = tokens.clone()
        self.tgt = targets.clone()
        self.graph, _ = self._capture(self._iteration, torch.cuda.graph_pool_handle())

    def _iteration(self) -> None:
        T, B = self.tok.shape[:2]
        with torch.enable_grad(), self._ctx():
            M = self.model.init_memory(B)
            total = 0.0
            for t in range(T):
                l_t, M = self.model.segment_loss(self.tok[t], self.tgt[t], M)
                total = total + l_t
            total = total / T
        self._accumulate(torch.autograd.grad(total, self.params, allow_unused=True))
        self.loss_acc.add_(total.detach())

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One iteration over tokens, targets (T, B, L) with the captured T."""
        self._check_grads()
        self.loss_acc.zero_()
        self.tok.copy_(tokens)
        self.tgt.copy_(targets)
        self.graph.replay()
        return self.loss_acc.clone()


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "bptt": bptt,
    "checkpoint": checkpointed,
    "mrbp": mrbp,
}
