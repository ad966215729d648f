"""Gradient routing of the Memformer LM over T segments: the baselines, and MRBP from the library.

Each method computes L = (1/T) sum_t l_t (l_t: segment t's mean cross-entropy) from
M_0 = model.init_memory(B) and leaves dL/dparam in the parameters' ``.grad`` (accumulated,
like ``loss.backward()``). All return L as a 0-d tensor (no host sync).

Baselines (kept here, they are what MRBP is measured against):

- :func:`bptt`: the whole T-segment graph, one backward.
- :func:`checkpointed`: ``torch.utils.checkpoint`` around every segment (non-reentrant):
  only each segment's inputs are saved, the segment is recomputed during backward.
- :class:`GraphedBPTT`: the whole BPTT iteration captured as one CUDA graph (CUDA only),
  the fair baseline for the graphed MRBP.

MRBP is memcore's model-agnostic driver, :mod:`memcore.backends.torch.mrbp_model`, run on
the model as its step (``model(memory, segment) -> (loss, next_memory)``) with
``model.advance`` as the memory path: :func:`mrbp` (eager) and :func:`graphed_mrbp`
(``graph=True``: the advance and the replayed backward as CUDA graphs). The bench holds no
MRBP code of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from bench.lm_model import MemformerLM
from memcore.backends.torch._mrbp_graphs import capture_graph
from memcore.backends.torch.mrbp_model import MRBP
from memcore.backends.torch.mrbp_model import recompute as mark

__all__ = [
    "METHODS",
    "RECOMPUTE",
    "GraphedBPTT",
    "bptt",
    "checkpointed",
    "graphed_mrbp",
    "lm_step",
    "mrbp",
]


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


RECOMPUTE = ("none", "layers", "lean", "keep")
"""Per-block recompute inside MRBP's replayed segment: ``none``; ``layers``: every block
(each encoder layer, the head + loss in token chunks, the write: the model's
``recompute="replay"``); ``lean``: the same but the write, whose backward runs first in the
replay (its saved tensors are freed before any other block is recomputed), so recomputing
it would cost a forward of the write and save no peak memory; ``keep``: ``lean`` with the
library's ``keep_blocks``: the no-grad forward records the encoder layers' outputs (4 x
(B, L, D) per segment, stashed with the memory), and the replay runs no layer forward: each
layer runs once in the forward and once in its backward, as under BPTT with checkpoints."""


def lm_step(model: MemformerLM, amp=None, recompute: str = "none"):
    """(step, advance) of the LM for the library's MRBP; segments {"tokens", "targets"}.

    The autocast weight cache is off (casts must be replayed inside a CUDA graph; each
    weight is cast once per segment anyway).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")

    def encode(tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if recompute != "keep":
            return model.encode(tokens, memory, "replay")
        # The layers marked in the advance too, so that it records their outputs (the
        # model's own encode marks them only while grad is on). No input validation: the
        # model validated on its first call.
        x = model.emb(tokens)
        for layer in model.layers:
            x = mark(layer, x, memory, False)
        return x

    def step(memory: torch.Tensor, segment: dict[str, torch.Tensor]):
        tokens, targets = segment["tokens"], segment["targets"]
        with _amp(tokens.device, amp, cache=False):
            if recompute in ("lean", "keep"):
                x = encode(tokens, memory)
                if not torch.is_grad_enabled():
                    return model._head_loss(x, targets), model.write(memory, x)
                loss = model._head_loss_chunked("replay", x, targets)
                return loss, model.write(memory, x)
            return model.segment_loss(tokens, targets, memory, recompute == "layers" and "replay")

    def advance(memory: torch.Tensor, segment: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = segment["tokens"]
        with _amp(tokens.device, amp, cache=False):
            if recompute == "keep":
                return model.write(memory, encode(tokens, memory))
            return model.advance(tokens, memory)

    return step, advance


def _m0(model: MemformerLM, batch: int, device: torch.device, amp) -> torch.Tensor:
    with _amp(device, amp):
        return model.init_memory(batch)  # its graph reaches v_bias: dM_0 goes through it


def mrbp(
    model: MemformerLM,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    amp=None,
    *,
    stash: str = "device",
    recompute: str = "none",
):
    """MRBP (Memformer Alg. 1) through the library's eager driver; returns L (0-d)."""
    T, B = tokens.shape[:2]
    step, advance = lm_step(model, amp, recompute)
    runner = MRBP(step, advance=advance, stash=stash, loss_scale=1.0 / T,
                  keep_blocks=recompute == "keep")  # fmt: skip
    segments = {"tokens": tokens, "targets": targets}
    return runner(_m0(model, B, tokens.device, amp), segments).loss


def graphed_mrbp(
    model: MemformerLM, tokens, targets, amp=None, *, stash: str = "device", recompute="none"
) -> Callable[[], torch.Tensor]:
    """A no-argument runner of the library's graphed MRBP over tokens, targets (T, B, L).

    The two CUDA graphs are captured here, before the runner is returned (so a caller can
    measure their memory pool); each call is one rollout and returns L (0-d).
    """
    T, B = tokens.shape[:2]
    step, advance = lm_step(model, amp, recompute)
    runner = MRBP(step, advance=advance, stash=stash, graph=True, loss_scale=1.0 / T,
                  keep_blocks=recompute == "keep")  # fmt: skip
    segments = {"tokens": tokens, "targets": targets}
    runner.capture(_m0(model, B, tokens.device, amp), segments)
    return lambda: runner(_m0(model, B, tokens.device, amp), segments).loss


class GraphedBPTT:
    """The whole BPTT iteration (forward and backward over T segments) as one CUDA graph.

    The graph adds the gradients into the parameters' ``.grad`` tensors (allocated before
    capture, captured by address): zero them in place between calls.

    Args:
        model: the LM on a CUDA device; tokens, targets: (T, B, L), fixing T at capture.
    """

    def __init__(self, model: MemformerLM, tokens: torch.Tensor, targets: torch.Tensor, amp=None):
        self.model, self.amp = model, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.acc = [p.grad for p in self.params]
        dev = self.params[0].device
        self.loss_acc = torch.zeros((), device=dev)
        self.tok, self.tgt = tokens.clone(), targets.clone()
        saved = [a.clone() for a in self.acc]  # the warm-up runs add into .grad
        self.graph, _ = capture_graph(self._iteration, dev, torch.cuda.graph_pool_handle())
        for a, s in zip(self.acc, saved):
            a.copy_(s)

    def _iteration(self) -> None:
        T, B = self.tok.shape[:2]
        with torch.enable_grad(), _amp(self.tok.device, self.amp, cache=False):
            M = self.model.init_memory(B)
            total = 0.0
            for t in range(T):
                l_t, M = self.model.segment_loss(self.tok[t], self.tgt[t], M)
                total = total + l_t
            total = total / T
        grads = torch.autograd.grad(total, self.params, allow_unused=True)
        for a, g in zip(self.acc, grads):
            if g is not None:
                a.add_(g)
        self.loss_acc.add_(total.detach())

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One iteration over tokens, targets (T, B, L) with the captured T."""
        if any(p.grad is not a for p, a in zip(self.params, self.acc)):
            raise RuntimeError("a .grad was replaced after capture: zero gradients in place")
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
