"""The recurrent units routing works on, as differentiable torch functions, and the losses.

``memformer_step`` (the smallest real Memformer memory cell) and ``sab_step`` (the
SAB-augmented LSTM, SAB Alg. 1) are plain forward functions: autograd supplies their
backward. Parameter names are :data:`memcore.routing_types.MEMFORMER_PARAMS` and
:data:`memcore.routing_types.SAB_PARAMS`.

The SAB routing drivers step with ``sab_bank_step`` over a :class:`SABMemories`: the same
step, whose retrieval is either the plain op (``retrieval="autograd"``) or the drivers'
fast path (``"fast"``, the default): a preallocated memory bank read by the custom
autograd Function of :mod:`.sab` (see its docstring), so no step copies or saves all the
memories. Only the retrieval's backward is hand-written; the LSTM, readout and losses are
differentiated by autograd in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from memcore.backends.torch._common import HALF
from memcore.backends.torch.attention import memory_read
from memcore.backends.torch.lstm import lstm_cell
from memcore.backends.torch.memory import memory_reset, memory_write
from memcore.backends.torch.sab import bank_retrieve, bank_write, sparse_retrieve
from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError
from memcore.routing_types import HEAD_PARAM

__all__ = [
    "RETRIEVALS",
    "SABMemories",
    "loss_weight",
    "memformer_step",
    "sab_bank_step",
    "sab_step",
    "stack_memories",
    "step_loss",
]

RETRIEVALS = ("fast", "autograd")


def memformer_step(
    params: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    memory: torch.Tensor,
    *,
    config: MemoryConfig,
    reset: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Memformer step: r = read(x_t, M), h = x_t + r, y_t = h, M' = write(M, h).

    Args:
        params: the MEMFORMER_PARAMS tensors ((D, D) projections, v_bias (K, D)).
        x_t: (B, L, D) tokens; memory: (B, K, D), M_t before the reset.
        config: K, D, H, tau.
        reset: (B,) bool or None: flagged rows of M_t become the initial memory first.
        token_mask: (B, L) bool or None, used by the write only.

    Returns:
        (M_{t+1} (B, K, D), y_t (B, L, D)).
    """
    p = params
    if reset is not None:
        memory = memory_reset(memory, p["v_bias"], reset=reset)
    r = memory_read(
        x_t, memory, p["read_wq"], p["read_wk"], p["read_wv"], p["read_wo"], num_heads=config.heads
    )
    h = x_t + r
    new_memory = memory_write(
        memory,
        h,
        p["write_wq"],
        p["write_wk"],
        p["write_wv"],
        p["v_bias"],
        num_heads=config.heads,
        tau=config.tau,
        token_mask=token_mask,
    )
    return new_memory, h


def stack_memories(memories: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B, N, Hd) from N tensors (B, Hd); an empty (B, 0, Hd) when there are none."""
    if not memories:
        return like.new_zeros((like.shape[0], 0, like.shape[-1]))
    return torch.stack(list(memories), dim=1)


def sab_step(
    params: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    memories: torch.Tensor,
    *,
    config: SABConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SAB step (SAB Alg. 1): LSTM, sparse retrieval, h = h_hat + s, readout.

    Args:
        params: the SAB_PARAMS tensors.
        x_t: (B, I); h, c: (B, Hd) entering the step; memories: (B, N, Hd).
        config: k_top, eps, threshold_grad, block_score_grad.

    Returns:
        (h (B, Hd), c (B, Hd), y_t (B, O) = h v1 + s v2 + b_y, weights (B, N)).
        Appending h to the memories is the caller's business (it knows t and k_att).
    """
    p = params
    h_hat, c = lstm_cell(x_t, h, c, p["lstm_w"], p["lstm_b"])
    s, w = sparse_retrieve(
        h_hat,
        memories,
        p["w1"],
        p["w2"],
        p["w3"],
        k_top=config.k_top,
        eps=config.eps,
        threshold_grad=config.threshold_grad,
        block_score_grad=config.block_score_grad,
    )
    h = h_hat + s
    y = h @ p["v1"] + s @ p["v2"] + p["b_y"]
    return h, c, y, w


class SABMemories:
    """The memories a SAB routing driver reads and writes, with their gradient accumulator.

    ``values`` (N_max, B, Hd) holds every memory vector (slot j = the j-th written; slot 0 is
    h0 with include_h0_memory), written once, so boundary states can be views of it.
    ``grad`` (like ``values``, made by :meth:`begin_chunk` / :meth:`track`) accumulates
    dL/dm_j from reads whose writer is not in the current graph, and, in "fast" mode, from
    every read. In "fast" mode reads use :func:`.sab.bank_retrieve`; in "autograd" mode they
    stack the memory tensors (graph tensors, or leaves per replayed chunk) and call the plain
    ``sparse_retrieve`` op: the reference path the fast one is tested against.

    Args:
        capacity: N_max, the memories the sequence writes; like: (B, Hd), dtype and device.
        retrieval: "fast" or "autograd" (half types always use "autograd").
    """

    def __init__(self, capacity: int, like: torch.Tensor, retrieval: str = "fast") -> None:
        if retrieval not in RETRIEVALS:
            raise MemcoreError(
                f"`retrieval` must be one of {', '.join(RETRIEVALS)}. Received: {retrieval!r}"
            )
        self.fast = retrieval == "fast" and like.dtype not in HALF
        self.values = like.new_empty((capacity,) + tuple(like.shape))
        self.grad: torch.Tensor | None = None
        self._token: torch.Tensor | None = None
        self._live: list[torch.Tensor] = []  # "autograd" mode: what the next read stacks
        self._leaves: list[torch.Tensor] = []
        self._written: list[tuple[torch.Tensor, int]] = []
        self._in_chunk = False
        # "autograd" mode's retrieval on stacked memories: (h_hat, memories, params, config)
        # -> s; None is memcore's sparse_retrieve (sab_model.retrieval_for plugs others in).
        self.retrieve = None

    def track(self) -> None:
        """Starts the gradient accumulator (zeros)."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.values)

    def begin_chunk(self, n_before: int) -> None:
        """A replayed chunk starts: slots [0, n_before) are read as constants of its graph."""
        self.track()
        self._token, self._written, self._in_chunk = None, [], True
        if not self.fast:
            self._leaves = [self.values[j].detach().requires_grad_(True) for j in range(n_before)]
            self._live = list(self._leaves)

    def read(self, h_hat: torch.Tensor, n: int, params, config: SABConfig) -> torch.Tensor:
        """s (B, Hd) from the first n memories."""
        p = params
        if self.fast:
            return bank_retrieve(self, n, h_hat, p["w1"], p["w2"], p["w3"], self._token, config)
        assert len(self._live) == n, (len(self._live), n)
        if self.retrieve is not None:
            return self.retrieve(h_hat, stack_memories(self._live, h_hat), p, config)
        return sparse_retrieve(
            h_hat,
            stack_memories(self._live, h_hat),
            p["w1"],
            p["w2"],
            p["w3"],
            k_top=config.k_top,
            eps=config.eps,
            threshold_grad=config.threshold_grad,
            block_score_grad=config.block_score_grad,
        )[0]

    def write(self, j: int, h: torch.Tensor, *, store: bool = True) -> None:
        """Memory j is h (B, Hd); ``store`` False: the slot already holds its value (replay)."""
        if self.fast:
            self._token = bank_write(self, j, h, self._token, store=store)
            return
        if store:
            self.values[j].copy_(h.detach())
        self._live.append(h)
        if self._in_chunk and h.requires_grad:
            self._written.append((h, j))

    def roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Extra (outputs, cotangents) for the backward: the accumulated gradient of the
        memories written in this graph ("autograd"), or the last write's token ("fast")."""
        if self.fast:
            tok = self._token
            return ([tok], [torch.zeros_like(tok)]) if tok is not None else ([], [])
        return [h for h, _ in self._written], [self.grad[j].clone() for _, j in self._written]

    def end_chunk(self) -> None:
        """After the backward: ("autograd") the leaves' gradients join the accumulator."""
        for j, leaf in enumerate(self._leaves):
            if leaf.grad is not None:
                self.grad[j] += leaf.grad
        self._leaves, self._live, self._written, self._token = [], [], [], None
        self._in_chunk = False


def sab_bank_step(
    params: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    memories: SABMemories,
    n: int,
    *,
    config: SABConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sab_step` reading the first n memories of ``memories``: (h, c, y_t), (B, Hd/O)."""
    p = params
    h_hat, c = lstm_cell(x_t, h, c, p["lstm_w"], p["lstm_b"])
    s = memories.read(h_hat, n, p, config)
    h = h_hat + s
    return h, c, h @ p["v1"] + s @ p["v2"] + p["b_y"]


def step_loss(
    y: torch.Tensor, target: torch.Tensor, kind: str, params: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """l_t: mean squared error over all elements, or mean softmax cross-entropy over positions.

    Args:
        y: (..., Dy) step output; target: like y (mse) or (...) integer class ids (xent).
        kind: "mse" or "xent" (logits = y @ params["head_w"], head_w (Dy, C)).
    """
    if kind == "mse":
        return ((y - target) ** 2).mean()
    logits = y @ params[HEAD_PARAM]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long())


def loss_weight(weights: Sequence[float] | None, t: int) -> float:
    """weight_t (1.0 when no weights are given)."""
    return 1.0 if weights is None else float(weights[t])
