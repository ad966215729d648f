"""Framework-native modules: Memformer memory reader and writer, the SAB cell, and MRBP training.

The modules hold their parameters as ``nn.Parameter`` and call the same torch ops the
backend serves, so their gradients are the conformance-tested ones. Inputs are checked
against the op specs (shapes and dtypes; no NaN scan, which would sync every step).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from memcore.backends.torch.attention import memory_read
from memcore.backends.torch.memory import memory_init, memory_reset, memory_write
from memcore.backends.torch.mrbp_model import mrbp
from memcore.backends.torch.stash import check_where
from memcore.backends.torch.steps import (
    loss_weight,
    memformer_step,
    sab_step,
    stack_memories,
    step_loss,
)
from memcore.backends.torch.validate import check_memformer
from memcore.config import MemoryConfig, SABConfig
from memcore.errors import MemcoreError
from memcore.ops import get_op
from memcore.routing_types import HEAD_PARAM, Loss

__all__ = [
    "MRBPResult",
    "MemoryReader",
    "MemoryWriter",
    "SABCell",
    "SABState",
    "memformer_params",
    "train_mrbp",
]


def _uniform(shape: tuple[int, ...], fan_in: int, dtype: Any, device: Any) -> nn.Parameter:
    bound = math.sqrt(3.0 / max(fan_in, 1))  # unit-variance outputs for unit-variance inputs
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound))


def _check(op: str, inputs: tuple[Any, ...], attributes: dict[str, Any]) -> None:
    get_op(op).validate(inputs, attributes)


class MemoryReader(nn.Module):
    """Tokens read the memory by multi-head cross-attention (Memformer Eq. 1-3).

    Args:
        dim: D; num_heads: H, dividing D; dtype, device: of the parameters.

    Attributes:
        wq, wk, wv, wo: (D, D) projections, no biases.
    """

    def __init__(
        self, dim: int, num_heads: int = 1, *, dtype: Any = None, device: Any = None
    ) -> None:
        """Create wq, wk, wv, wo (D, D), each U(+-1/sqrt(D)).

        Args:
            dim: D, the token and slot width.
            num_heads: H, attention heads; must divide D.
            dtype, device: of the parameters (torch's defaults when None).

        Raises:
            MemcoreError: dim or num_heads below 1, or H not dividing D.
        """
        super().__init__()
        MemoryConfig(slots=1, dim=dim, heads=num_heads)  # validates dim and heads
        self.dim, self.num_heads = dim, num_heads
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, _uniform((dim, dim), dim, dtype, device))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D), memory: (B, K, D) -> (B, L, D)."""
        ins = (x, memory, self.wq, self.wk, self.wv, self.wo)
        _check("memory_read", ins, {"num_heads": self.num_heads})
        return memory_read(*ins, num_heads=self.num_heads)

    def extra_repr(self) -> str:
        """Shown by ``print(reader)``: ``dim=D, num_heads=H``."""
        return f"dim={self.dim}, num_heads={self.num_heads}"


class MemoryWriter(nn.Module):
    """Slot-attention write followed by Biased Memory Normalization; owns ``v_bias``.

    Args:
        slots: K; dim: D; num_heads: H; tau: write temperature in (0, 1] (Eq. 7).

    Attributes:
        wq, wk, wv: (D, D); v_bias: (K, D), also the initial memory's direction.
    """

    def __init__(
        self,
        slots: int,
        dim: int,
        num_heads: int = 1,
        tau: float = 0.25,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        """Create wq, wk, wv (D, D) and v_bias (K, D), each U(+-1/sqrt(D)).

        Args:
            slots: K, memory slots.
            dim: D, the slot and token width.
            num_heads: H, attention heads; must divide D.
            tau: write temperature in (0, 1]; logits are divided by sqrt(D/H) * tau (Eq. 7).
            dtype, device: of the parameters (torch's defaults when None).

        Raises:
            MemcoreError: a size below 1, H not dividing D, or tau outside (0, 1].
        """
        super().__init__()
        self.config = MemoryConfig(slots=slots, dim=dim, heads=num_heads, tau=tau)
        for name in ("wq", "wk", "wv"):
            setattr(self, name, _uniform((dim, dim), dim, dtype, device))
        self.v_bias = _uniform((slots, dim), dim, dtype, device)

    @property
    def tau(self) -> float:
        return self.config.tau

    def forward(
        self, memory: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """memory: (B, K, D), x: (B, L, D), token_mask: (B, L) bool or None -> M' (B, K, D)."""
        ins = (memory, x, self.wq, self.wk, self.wv, self.v_bias)
        at = {"num_heads": self.config.heads, "tau": self.config.tau, "token_mask": token_mask}
        _check("memory_write", ins, at)
        return memory_write(*ins, **at)

    def extra_repr(self) -> str:
        """Shown by ``print(writer)``: ``slots=K, dim=D, num_heads=H, tau=tau``."""
        c = self.config
        return f"slots={c.slots}, dim={c.dim}, num_heads={c.heads}, tau={c.tau}"

    def init_memory(self, batch_size: int) -> torch.Tensor:
        """M_0 = normalize(v_bias) for ``batch_size`` examples: (B, K, D), differentiable."""
        _check("memory_init", (self.v_bias,), {"batch_size": batch_size})
        return memory_init(self.v_bias, batch_size=batch_size)

    def reset(self, memory: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Rows with ``flags`` (B,) bool set become the initial memory: (B, K, D)."""
        _check("memory_reset", (memory, self.v_bias), {"reset": flags})
        return memory_reset(memory, self.v_bias, reset=flags)


def memformer_params(
    reader: MemoryReader, writer: MemoryWriter, head: torch.Tensor | None = None
) -> dict[str, Any]:
    """The modules' parameters under the routing names (MEMFORMER_PARAMS, + head_w)."""
    if reader.dim != writer.config.dim or reader.num_heads != writer.config.heads:
        raise MemcoreError(
            f"`reader` must have the writer's dim and heads "
            f"({writer.config.dim}, {writer.config.heads}). "
            f"Received: dim={reader.dim}, num_heads={reader.num_heads}"
        )
    out = {f"read_{n}": getattr(reader, n) for n in ("wq", "wk", "wv", "wo")}
    out.update({f"write_{n}": getattr(writer, n) for n in ("wq", "wk", "wv")})
    out["v_bias"] = writer.v_bias
    if head is not None:
        out[HEAD_PARAM] = head
    return out


class MRBPResult(NamedTuple):
    """loss: the rollout's total loss L; memory: M_T (B, K, D), detached, for the next rollout."""

    loss: float
    memory: torch.Tensor


def train_mrbp(
    reader: MemoryReader,
    writer: MemoryWriter,
    xs: torch.Tensor,
    M0: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss: Loss = Loss(),
    resets: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    truncate_every: int | None = None,
    head: torch.Tensor | None = None,
    stash: str = "device",
) -> MRBPResult:
    """One MRBP rollout (Memformer Alg. 1) that leaves dL/dparam in the modules' ``.grad``.

    Gradients accumulate like ``loss.backward()``: zero them between optimizer steps.
    When ``M0`` carries a graph (e.g. ``writer.init_memory(B)``), dM_0 is sent through it,
    so ``v_bias`` also gets the initial memory's share; pass ``M0.detach()`` to truncate
    at the rollout boundary.

    Args:
        reader, writer: the Memformer memory modules.
        xs: (T, B, L, D); M0: (B, K, D); targets: (T, B, L, D) (mse) or (T, B, L) ids (xent).
        loss: per-step loss and weights; head: (D, C) linear head for xent (its .grad too).
        resets: (T, B) bool; token_mask: (T, B, L) bool; truncate_every: see routing.mrbp.
        stash: where the stored memories M_0..M_{T-1} wait for the backward: "device", or
            "host" to offload them to pinned host memory (:class:`~memcore.backends.torch.stash.MemoryStash`), which keeps
            the device's share flat in T at the same gradients.

    Returns:
        MRBPResult(loss, M_T).
    """
    P = memformer_params(reader, writer, head)
    cfg = writer.config
    check_memformer(
        P,
        xs,
        M0,
        targets,
        config=cfg,
        loss=loss,
        resets=resets,
        token_mask=token_mask,
        truncate_every=truncate_every,
        memory_arg="M0",
    )
    check_where(stash, "stash")

    def step(M: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        M_next, y = memformer_step(
            P,
            xs[t],
            M,
            config=cfg,
            reset=None if resets is None else resets[t],
            token_mask=None if token_mask is None else token_mask[t],
        )
        return loss_weight(loss.weights, t) * step_loss(y, targets[t], loss.kind, P), M_next

    # The segments are the step indices; M0's graph (if any) gets dM_0 inside mrbp.
    out = mrbp(step, M0, list(range(xs.shape[0])), stash=stash, truncate_every=truncate_every)
    return MRBPResult(float(out.loss), out.memory)


class SABState(NamedTuple):
    """h, c: (B, Hd); memories: the N memory vectors (B, Hd) so far; t: steps taken."""

    h: torch.Tensor
    c: torch.Tensor
    memories: tuple[torch.Tensor, ...]
    t: int


class SABCell(nn.Module):
    """The SAB-augmented LSTM cell (SAB Alg. 1) with its memory of past hidden states.

    Args:
        input_size: I; hidden_size: Hd; output_size: O; scorer_width: A.
        config: k_top, k_att, k_trunc, eps and the stop-gradient switches.
        truncate: cut (h, c) entering steps t = 1 + m k_trunc (m >= 1) while grad is on,
            so backward through a rollout equals the routing contract's ``sab_bptt``.

    Attributes:
        lstm_w (I+Hd, 4Hd), lstm_b (4Hd,), w1, w2 (Hd, A), w3 (A,), v1, v2 (Hd, O), b_y (O,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        scorer_width: int,
        config: SABConfig = SABConfig(),
        *,
        truncate: bool = True,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        """Create the LSTM, scorer and output parameters (shapes in the class docstring).

        Args:
            input_size: I, the width of x_t.
            hidden_size: Hd, the LSTM width.
            output_size: O, the width of y_t.
            scorer_width: A, the width of the attention scorer.
            config: a memcore.SABConfig (k_top, k_att, k_trunc, eps, stop-gradient switches).
            truncate: cut (h, c) at chunk boundaries while grad is on (see the class).
            dtype, device: of the parameters (torch's defaults when None).

        Raises:
            MemcoreError: ``config`` is not a SABConfig.
        """
        super().__init__()
        if not isinstance(config, SABConfig):
            raise MemcoreError(
                f"`config` must be a memcore.SABConfig. Received: {type(config).__name__}"
            )
        self.config, self.truncate = config, truncate
        I, Hd, O, A = input_size, hidden_size, output_size, scorer_width
        self.lstm_w = _uniform((I + Hd, 4 * Hd), I + Hd, dtype, device)
        self.lstm_b = nn.Parameter(torch.zeros(4 * Hd, dtype=dtype, device=device))
        self.w1 = _uniform((Hd, A), Hd, dtype, device)
        self.w2 = _uniform((Hd, A), Hd, dtype, device)
        self.w3 = _uniform((A,), A, dtype, device)
        self.v1 = _uniform((Hd, O), Hd, dtype, device)
        self.v2 = _uniform((Hd, O), Hd, dtype, device)
        self.b_y = nn.Parameter(torch.zeros(O, dtype=dtype, device=device))

    def params(self) -> dict[str, nn.Parameter]:
        """The parameters under the routing names (SAB_PARAMS)."""
        return {
            n: getattr(self, n) for n in ("lstm_w", "lstm_b", "w1", "w2", "w3", "v1", "v2", "b_y")
        }

    def extra_repr(self) -> str:
        """Shown by ``print(cell)``: sizes (I, Hd, O, A), k_top, k_att, k_trunc, truncate."""
        hd = self.lstm_b.shape[0] // 4
        c = self.config
        return (
            f"input_size={self.lstm_w.shape[0] - hd}, hidden_size={hd}, "
            f"output_size={self.b_y.shape[0]}, "
            f"scorer_width={self.w3.shape[0]}, k_top={c.k_top}, k_att={c.k_att}, "
            f"k_trunc={c.k_trunc}, truncate={self.truncate}"
        )

    def initial_state(self, h0: torch.Tensor, c0: torch.Tensor | None = None) -> SABState:
        """State before step 1 from h0 (B, Hd) and c0 (default zeros); h0 may be a memory."""
        c0 = torch.zeros_like(h0) if c0 is None else c0
        return SABState(h0, c0, (h0,) if self.config.include_h0_memory else (), 0)

    def forward(
        self, x_t: torch.Tensor, state: SABState
    ) -> tuple[torch.Tensor, SABState, torch.Tensor]:
        """One step: x_t (B, I) -> (y_t (B, O), next state, weights (B, N))."""
        cfg = self.config
        t = state.t + 1
        h, c = state.h, state.c
        if self.truncate and t > 1 and (t - 1) % cfg.k_trunc == 0:
            h, c = h.detach(), c.detach()
        _check("lstm_cell", (x_t, h, c, self.lstm_w, self.lstm_b), {})
        h, c, y, w = sab_step(
            self.params(), x_t, h, c, stack_memories(state.memories, h), config=cfg
        )
        memories = state.memories + (h,) if t % cfg.k_att == 0 else state.memories
        return y, SABState(h, c, memories, t), w
