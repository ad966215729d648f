"""The Memformer language model in torch, built from memcore's memory reader and writer.

Token embedding; ``config.layers`` pre-norm encoder layers of causal self-attention, memory
read (:class:`~memcore.backends.torch.modules.MemoryReader`, Memformer Eq. 1-3: the read
happens in every layer, Sec. 3.3) and FFN; after the last layer the memory is written
(:class:`~memcore.backends.torch.modules.MemoryWriter`: slot attention + BMN, Sec. 3.4,
"only at the last layer of the encoder"); a linear head predicts the next token. One
*segment* is L tokens; the memory M (B, K, D) is the only state that crosses segments, and
the initial memory is M_0 = normalize(v_bias), differentiable with respect to ``v_bias``.

The model is itself an MRBP ``step``: ``model(memory, segment) -> (loss, next_memory)``,
so the model-agnostic drivers (``memcore.backends.torch.mrbp_model``) train it as they train
any step; :meth:`MemformerLM.advance` is the memory path alone (no head, no loss) that the
driver's no-grad forward can use.

Why no decoder. The paper's encoder is bidirectional over s_t and a separate decoder, with
cross-attention to the encoder's output, predicts s_{t+1} (Sec. 3.1). Here the encoder's
self-attention is causal and the head predicts the segment's own next tokens from the
encoder's output, which gives the same factorization P(s_t | s_<t) with the past reaching
the segment only through M_{t-1}, in one stack instead of two. The decoder would add a
second transformer on the per-segment loss branch only: it never touches the memory
recurrence, which is what memcore's ops and MRBP are about (the replayed segment would just
recompute it like the head), and it would double the model code that is not memcore's
subject. The classification tokens the paper appends before the write are not used either:
the slot attention reads every token of the segment.

Validation: the reader and writer modules check their inputs against the op specs on every
call (~0.1 ms of Python each); the model checks once, on its first segment, and then calls
the same functional ops (``memory_read`` / ``memory_write``) on the modules' parameters, so
a step costs the math, not the checks. :meth:`MemformerLM.forward` also checks the
segment's structure and shapes (Python only, no device sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memcore.backends.torch.attention import memory_read
from memcore.backends.torch.memory import memory_write
from memcore.backends.torch.modules import MemoryReader, MemoryWriter
from memcore.errors import MemcoreError
from memcore.models import MemformerConfig

__all__ = ["EncoderLayer", "MemformerLM"]

_HALVES = (torch.float16, torch.bfloat16)


class EncoderLayer(nn.Module):
    """Pre-norm layer: x += SelfAttn(LN x); x += MemoryRead(LN x, M); x += FFN(LN x).

    Args:
        dim: D; heads: H (D divisible by H); ffn_mult: FFN width over D.
        dtype, device: of the parameters.
    """

    def __init__(
        self, dim: int, heads: int, ffn_mult: int = 4, *, dtype: Any = None, device: Any = None
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.heads = heads
        self.ln_attn = nn.LayerNorm(dim, **kw)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **kw)
        self.proj = nn.Linear(dim, dim, bias=False, **kw)
        self.ln_read = nn.LayerNorm(dim, **kw)
        self.reader = MemoryReader(dim, heads, **kw)
        self.ln_ffn = nn.LayerNorm(dim, **kw)
        self.fc1 = nn.Linear(dim, ffn_mult * dim, **kw)
        self.fc2 = nn.Linear(ffn_mult * dim, dim, **kw)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, validate: bool) -> torch.Tensor:
        """x: (B, L, D), memory: (B, K, D) -> (B, L, D)."""
        b, n, d = x.shape
        q, k, v = (
            t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
            for t in self.qkv(self.ln_attn(x)).chunk(3, dim=-1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.ln_read(x)
        r = self.reader
        if validate:
            x = x + r(h, memory)
        else:
            x = x + memory_read(h, memory, r.wq, r.wk, r.wv, r.wo, num_heads=r.num_heads)
        return x + self.fc2(F.gelu(self.fc1(self.ln_ffn(x))))


class MemformerLM(nn.Module):
    """Embedding -> layers (self-attn + memory read + FFN) -> memory write; linear head.

    Args:
        config: a :class:`memcore.models.MemformerConfig`.
        dtype, device: of the parameters (default: torch's defaults).

    Attributes:
        recompute: the default of :meth:`forward`'s per-block recompute: False, True or
            "replay" (see :meth:`segment_loss`).
    """

    HEAD_CHUNKS = 4
    """Token chunks of the head and loss under ``recompute``."""

    def __init__(self, config: MemformerConfig, *, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        if not isinstance(config, MemformerConfig):
            raise MemcoreError(
                "`config` must be a memcore.models.MemformerConfig. "
                f"Received: {type(config).__name__}"
            )
        c, kw = config, {"dtype": dtype, "device": device}
        self.config = c
        self.emb = nn.Embedding(c.vocab, c.dim, **kw)
        self.layers = nn.ModuleList(
            [EncoderLayer(c.dim, c.heads, c.ffn_mult, **kw) for _ in range(c.layers)]
        )
        self.ln_write = nn.LayerNorm(c.dim, **kw)
        self.writer = MemoryWriter(c.slots, c.dim, c.heads, c.tau, **kw)
        self.ln_out = nn.LayerNorm(c.dim, **kw)
        self.head = nn.Linear(c.dim, c.vocab, bias=False, **kw)
        self._validated = False
        self.fused_write = c.fused_write
        self.recompute = False

    def init_memory(self, batch: int) -> torch.Tensor:
        """M_0 = normalize(v_bias) (B, K, D), differentiable with respect to v_bias."""
        return self.writer.init_memory(batch)

    def encode(
        self, tokens: torch.Tensor, memory: torch.Tensor, recompute: bool | str = False
    ) -> torch.Tensor:
        """tokens: (B, L) ids, memory: (B, K, D) -> last layer's output (B, L, D).

        ``recompute``: keep only each layer's input for backward and recompute the layer
        in it (``torch.utils.checkpoint``), so one layer's graph is alive at a time; True
        whenever grad is on, "replay" only inside MRBP's replayed segment.
        """
        validate = not self._validated
        x = self.emb(tokens)
        for layer in self.layers:
            if recompute and not validate and torch.is_grad_enabled():
                x = _recomputed(recompute, layer, x, memory, False)
            else:
                x = layer(x, memory, validate)
        self._validated = True
        return x

    def write(self, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """M' = BMN(slot_attention(M, LN x)): (B, K, D) from memory (B, K, D), x (B, L, D)."""
        h = self.ln_write(x)
        w = self.writer
        c = w.config
        if self.fused_write:  # imported here: triton_write pulls in Triton when present
            from memcore.backends.torch.triton_write import fused_memory_write as op
        else:
            op = memory_write
        return op(memory, h, w.wq, w.wk, w.wv, w.v_bias, num_heads=c.heads, tau=c.tau)

    def advance(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The memory update alone (no head, no loss): what MRBP's no-grad forward needs."""
        return self.write(memory, self.encode(tokens, memory))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, C) from the last layer's output x (B, L, D)."""
        logits = self.head(self.ln_out(x))
        # The loss runs in float32 under bf16/fp16 and in the parameters' dtype otherwise
        # (float64 stays float64, so gradient checks can reach 1e-10).
        return logits.float() if logits.dtype in _HALVES else logits

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def _head_loss_sum(
        self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weights is None:
            return F.cross_entropy(self.logits(x), targets, reduction="sum")
        ce = F.cross_entropy(self.logits(x), targets, reduction="none")
        return (ce * weights).sum()

    def _head_loss_chunked(
        self, mode: bool | str, x: torch.Tensor, targets: torch.Tensor, weights: Any = None
    ) -> torch.Tensor:
        """The loss over ``HEAD_CHUNKS`` recomputed token chunks: the (tokens, vocab)
        logits, their softmax and gradient exist for one chunk at a time. Mean
        cross-entropy without ``weights``, sum_i weights_i ce_i with them."""
        n = targets.numel()
        size = -(-n // self.HEAD_CHUNKS)
        xs, ts = x.reshape(n, -1).split(size), targets.reshape(n).split(size)
        if weights is None:
            chunks = zip(xs, ts)
            return sum(_recomputed(mode, self._head_loss_sum, xc, tc) for xc, tc in chunks) / n
        ws = weights.reshape(n).split(size)
        return sum(
            _recomputed(mode, self._head_loss_sum, xc, tc, wc) for xc, tc, wc in zip(xs, ts, ws)
        )

    def segment_loss(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        memory: torch.Tensor,
        recompute: bool | str = False,
        *,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the segment's loss, M') for tokens, targets (B, L) and memory (B, K, D).

        The loss is the mean next-token cross-entropy, or sum_{b,l} weights[b,l] ce[b,l]
        when ``weights`` (broadcastable to (B, L)) is given, e.g. a mask over the scored
        positions divided by their count, or zeros for a segment that is not scored.

        ``recompute``: per-block recomputation inside the segment (each layer, the head
        with the loss in token chunks, and the write), for MRBP's replayed step: its
        backward then holds one block's graph at a time instead of the whole segment's.
        True recomputes whenever grad is on; "replay" marks the blocks with
        :func:`memcore.backends.torch.mrbp_model.recompute`, so they are recomputed only
        inside MRBP's replayed segment and run plainly elsewhere (BPTT, evaluation).
        Gradients are the same in every mode.
        """
        if recompute not in (False, True, "replay"):
            raise MemcoreError(
                "`recompute` must be False, True or 'replay'. "
                f"Received: recompute={recompute!r}"
            )
        x = self.encode(tokens, memory, recompute)
        if weights is not None:  # in the loss's dtype (float32 under bf16/fp16)
            dtype = torch.float32 if x.dtype in _HALVES else x.dtype
            weights = torch.broadcast_to(weights, targets.shape).to(dtype)
        if recompute and torch.is_grad_enabled():
            loss = self._head_loss_chunked(recompute, x, targets, weights)
            return loss, _recomputed(recompute, self.write, memory, x)
        if weights is None:
            loss = self._head_loss(x, targets)
        else:
            flat_x = x.reshape(-1, x.shape[-1])
            loss = self._head_loss_sum(flat_x, targets.reshape(-1), weights.reshape(-1))
        return loss, self.write(memory, x)

    def forward(
        self, memory: torch.Tensor, segment: Any, recompute: bool | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MRBP step: ``(loss, next_memory)`` from memory (B, K, D) and a segment.

        Args:
            memory: M_t (B, K, D).
            segment: ``(tokens, targets)``, each (B, L) integer ids, or a mapping with keys
                ``tokens``, ``targets`` and optionally ``weights`` (see :meth:`segment_loss`).
            recompute: per-block recompute; None uses :attr:`recompute`.

        Returns:
            (loss (), M_{t+1} (B, K, D)).
        """
        tokens, targets, weights = _unpack(segment)
        _check_shapes(tokens, targets, memory, self.config)
        rec = self.recompute if recompute is None else recompute
        return self.segment_loss(tokens, targets, memory, rec, weights=weights)


def _unpack(segment: Any) -> tuple[Any, Any, Any]:
    if isinstance(segment, Mapping):
        missing = [k for k in ("tokens", "targets") if k not in segment]
        extra = sorted(set(segment) - {"tokens", "targets", "weights"})
        if missing or extra:
            raise MemcoreError(
                "`segment` must be (tokens, targets) or a mapping with keys tokens, targets "
                f"and optionally weights. Received: keys {sorted(segment)}"
            )
        return segment["tokens"], segment["targets"], segment.get("weights")
    if isinstance(segment, (tuple, list)) and len(segment) == 2:
        return segment[0], segment[1], None
    raise MemcoreError(
        "`segment` must be (tokens, targets) or a mapping with keys tokens, targets "
        f"and optionally weights. Received: {type(segment).__name__}"
    )


def _check_shapes(tokens: Any, targets: Any, memory: Any, c: MemformerConfig) -> None:
    for name, t in (("tokens", tokens), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise MemcoreError(
                f"`{name}` must be an integer tensor of shape (B, L). Received: {name}={shape}"
            )
    if targets.shape != tokens.shape:
        raise MemcoreError(
            f"`targets` must have the tokens' shape (B, L) = {tuple(tokens.shape)}. "
            f"Received: targets.shape={tuple(targets.shape)}"
        )
    want = (tokens.shape[0], c.slots, c.dim)
    if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != want:
        got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise MemcoreError(
            f"`memory` must have shape (B, K, D) = {want}. Received: memory.shape={got}"
        )


def _recomputed(mode: bool | str, fn, *args):
    if mode == "replay":  # checkpointed inside MRBP's replayed segment only
        from memcore.backends.torch.mrbp_model import recompute

        return recompute(fn, *args)
    # No dropout or other randomness in the model, so no RNG state to save (which would
    # also be illegal inside a CUDA graph capture).
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
