"""Shared pieces of the cell-generic torch SAB drivers (:mod:`.sab_model`): the schedule
(N_t, N_max, chunk starts with ``trunc_phase``), the cell-state helpers, the retrieval plug
point (:func:`retrieval_for`), one driver call's step and loss plumbing, and entry checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from memcore.backends.torch.sab import sparse_retrieve
from memcore.backends.torch.steps import RETRIEVALS, SABMemories
from memcore.config import SABConfig
from memcore.errors import MemcoreError
from memcore.routing_types import HEAD_PARAM, Loss

__all__ = [
    "Call",
    "Retrieval",
    "capacity",
    "check_call",
    "chunk_starts",
    "detach_state",
    "flat_state",
    "hidden",
    "make_bank",
    "n_read",
    "retrieval_for",
    "unflat_state",
    "with_hidden",
]

Readout = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]

# ----------------------------------------------------------------------------- schedule
def n_read(t: int, config: SABConfig) -> int:
    """N_t, the memories step t (1-based) reads; also the slot step t writes when t % k_att == 0."""
    return int(config.include_h0_memory) + (t - 1) // config.k_att


def capacity(steps: int, config: SABConfig) -> int:
    """N_max: the memories a sequence of ``steps`` writes (h0 included with include_h0_memory)."""
    return n_read(steps + 1, config)


def chunk_starts(steps: int, k_trunc: int, trunc_phase: int = 0) -> tuple[int, ...]:
    """1-based first steps of the truncation chunks: 1, then each t in 2..T with
    (t - 1 - trunc_phase) % k_trunc == 0 ((h, c) is cut entering those steps)."""
    if isinstance(trunc_phase, bool) or not isinstance(trunc_phase, int):
        raise MemcoreError(f"`trunc_phase` must be an integer. Received: {trunc_phase!r}")
    if not 0 <= trunc_phase < k_trunc:
        raise MemcoreError(
            f"`trunc_phase` must be in [0, k_trunc) = [0, {k_trunc}). Received: {trunc_phase}"
        )
    cuts = range(1 + trunc_phase if trunc_phase else 1 + k_trunc, steps + 1, k_trunc)
    return (1, *cuts)


def hidden(state: Any) -> torch.Tensor:
    """The hidden vector of a cell state: the state itself or its element 0."""
    return state if isinstance(state, torch.Tensor) else state[0]


def with_hidden(state: Any, h: torch.Tensor) -> Any:
    """``state`` with its hidden vector replaced by ``h`` (same container type)."""
    if isinstance(state, torch.Tensor):
        return h
    return type(state)([h, *state[1:]]) if isinstance(state, list) else (h, *state[1:])


def detach_state(state: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, state)


# ----------------------------------------------------------------------------- retrieval
class Retrieval(NamedTuple):
    """How a step reads the bank: ``fast`` (the bank's hand-written backward, memcore's
    scorer and sparsifier only) or ``retrieve(h_hat, memories (B, N, Hd), params, config)
    -> s (B, Hd)`` on stacked memories with autograd."""

    fast: bool
    retrieve: Callable[..., torch.Tensor]


def _memcore_retrieve(h_hat, memories, params, config) -> torch.Tensor:
    return sparse_retrieve(
        h_hat,
        memories,
        params["w1"],
        params["w2"],
        params["w3"],
        k_top=config.k_top,
        eps=config.eps,
        threshold_grad=config.threshold_grad,
        block_score_grad=config.block_score_grad,
    )[0]


def retrieval_for(config: SABConfig, retrieval: str = "fast") -> Retrieval:
    """The scorer and sparsifier for ``config``: the one place they are chosen.

    memcore's (docs/semantics.md 3.8-3.10) is the only one today; a config field selecting
    another (e.g. the authors' release) maps to another ``retrieve`` here, with ``fast``
    False unless it has its own bank backward.
    """
    if retrieval not in RETRIEVALS:
        raise MemcoreError(
            f"`retrieval` must be one of {', '.join(RETRIEVALS)}. Received: {retrieval!r}"
        )
    if config.scorer != "memcore" or config.sparsify != "memcore":  # issue 14.4
        from memcore.backends.torch.sab_release import retrieve

        return Retrieval(False, retrieve)
    return Retrieval(retrieval == "fast", _memcore_retrieve)


# ----------------------------------------------------------------------------- one call
class Call:
    """One driver call's fixed inputs and its step / loss plumbing."""

    def __init__(self, cell, P, xs, targets, config, loss, readout, weights_dev=None):
        self.cell, self.P, self.xs, self.targets = cell, P, xs, targets
        self.cfg, self.kind, self.readout = config, loss.kind, readout
        T = int(xs.shape[0])
        self.weights = tuple(1.0 for _ in range(T)) if loss.weights is None else tuple(
            float(w) for w in loss.weights
        )
        self._w_dev = weights_dev

    def w_dev(self) -> torch.Tensor:
        if self._w_dev is None:  # eager only: a captured step passes it in
            self._w_dev = torch.tensor(self.weights, dtype=self.xs.dtype, device=self.xs.device)
        return self._w_dev

    def step(self, t: int, state: Any, bank: SABMemories) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Step t (1-based): (state', h, s)."""
        h_hat, state = self.cell(self.P, self.xs[t - 1], state)
        s = bank.read(h_hat, n_read(t, self.cfg), self.P, self.cfg)
        h = h_hat + s
        return with_hidden(state, h), h, s

    def has_loss(self, first: int, last: int) -> bool:
        return any(w != 0.0 for w in self.weights[first - 1 : last])

    def loss(self, first: int, hs: list, ss: list) -> torch.Tensor | None:
        """sum_t weight_t l_t over steps first .. first + len(hs) - 1, one readout per run of
        steps with non-zero weight (zero-weight steps are left out of the graph)."""
        total = None
        t, last = first, first + len(hs) - 1
        while t <= last:
            if self.weights[t - 1] == 0.0:
                t += 1
                continue
            end = t
            while end < last and self.weights[end] != 0.0:
                end += 1
            i, j = t - first, end - first + 1
            y = self.readout(self.P, torch.stack(hs[i:j]), torch.stack(ss[i:j]))
            per = _per_step_loss(y, self.targets[t - 1 : end], self.kind, self.P)
            if any(w != 1.0 for w in self.weights[t - 1 : end]):
                per = per * self.w_dev()[t - 1 : end]
            part = per.sum()
            total = part if total is None else total + part
            t = end + 1
        return total


def _per_step_loss(y, target, kind, P) -> torch.Tensor:
    """(n,): l_t for n stacked steps: mse over every element, or mean xent over positions."""
    n = y.shape[0]
    if kind == "mse":
        return ((y - target) ** 2).reshape(n, -1).mean(1)
    logits = y @ P[HEAD_PARAM] if HEAD_PARAM in P else y  # no head: y gives the logits
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(), reduction="none"
    )
    return ce.view(n, -1).mean(1)


def make_bank(call: Call, state0: Any, retrieval: Retrieval) -> SABMemories:
    T, h0 = int(call.xs.shape[0]), hidden(state0)
    mem = SABMemories(capacity(T, call.cfg), h0, "fast" if retrieval.fast else "autograd")
    mem.retrieve = retrieval.retrieve
    return mem


def flat_state(state: Any) -> list[torch.Tensor]:
    return [state] if isinstance(state, torch.Tensor) else list(state)


def unflat_state(like: Any, leaves: list[torch.Tensor]) -> Any:
    return leaves[0] if isinstance(like, torch.Tensor) else type(like)(leaves)


# ----------------------------------------------------------------------------- checks
def check_call(params, xs, state0, targets, config, loss) -> None:
    """Entry checks of the cell drivers (the cell checks its own parameters)."""
    if not isinstance(config, SABConfig):
        raise MemcoreError(
            f"`config` must be a memcore.SABConfig. Received: {type(config).__name__}"
        )
    if not isinstance(loss, Loss):
        raise MemcoreError(
            f"`loss` must be a memcore.routing_types.Loss. Received: {type(loss).__name__}"
        )
    if not isinstance(xs, torch.Tensor) or xs.ndim != 3 or not xs.is_floating_point():
        got = f"shape {tuple(xs.shape)}" if isinstance(xs, torch.Tensor) else type(xs).__name__
        raise MemcoreError(
            f"`xs` must be a floating torch.Tensor of shape (T, B, I). Received: {got}"
        )
    T, B = int(xs.shape[0]), int(xs.shape[1])
    if T < 1 or B < 1:
        raise MemcoreError(
            f"`xs` must have T >= 1 and B >= 1. Received: xs.shape={tuple(xs.shape)}"
        )
    if loss.weights is not None and len(loss.weights) != T:
        raise MemcoreError(
            f"`loss.weights` must have one weight per step ({T}). Received: {len(loss.weights)}"
        )
    h0 = hidden(state0)
    if not isinstance(h0, torch.Tensor) or h0.ndim != 2 or int(h0.shape[0]) != B:
        got = tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
        raise MemcoreError(f"`state0` hidden must have shape (B, Hd) with B = {B}. Received: {got}")
    scorer = ("w_score",) if config.scorer == "release" else ("w1", "w2", "w3")
    need = scorer  # xent without head_w: y gives the logits (the release's model)
    missing = [k for k in need if k not in params]
    if missing:
        raise MemcoreError(f"`params` must contain {', '.join(need)}. Received: missing {missing}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape[:2]) != (T, B):
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise MemcoreError(
            f"`targets` must have shape (T, B, ...) = ({T}, {B}, ...). Received: {got}"
        )
