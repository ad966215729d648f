"""Memformer-lite language model built from memcore's torch memory modules.

Token embedding; ``layers`` pre-norm encoder layers of causal self-attention, memory read
(:class:`memcore.backends.torch.MemoryReader`) and FFN; after the last layer the memory
is written (:class:`memcore.backends.torch.MemoryWriter`: slot attention + BMN); a linear
head predicts the next token. One *segment* is L tokens; the memory M (B, K, D) carries
information from segment to segment, and is the only state that does.

The modules validate their inputs against the op specs on every call, which costs about
0.1 ms of Python per call; the model validates once (first segment) and then calls the same
functional ops (``memory_read`` / ``memory_write``) on the modules' parameters, so the
benchmark times the math, not the checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from memcore.backends.torch.attention import memory_read
from memcore.backends.torch.memory import memory_write
from memcore.backends.torch.modules import MemoryReader, MemoryWriter
from memcore.backends.torch.triton_write import fused_memory_write
from torch import nn

__all__ = ["EncoderLayer", "MemformerLM"]


class EncoderLayer(nn.Module):
    """Pre-norm layer: x += SelfAttn(LN x); x += MemoryRead(LN x, M); x += FFN(LN x).

    Args:
        dim: D; heads: H (D divisible by H); ffn_mult: FFN width over D.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ln_read = nn.LayerNorm(dim)
        self.reader = MemoryReader(dim, heads)
        self.ln_ffn = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_mult * dim)
        self.fc2 = nn.Linear(ffn_mult * dim, dim)

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
        vocab: C; dim: D; heads: H; layers: number of encoder layers; slots: K; tau: write
        temperature; fused_write: write through the Triton kernels of
        ``backends/torch/triton_write.py`` (falls back to the torch op where they cannot run).
    """

    HEAD_CHUNKS = 4
    """Token chunks of the head and loss under ``recompute``."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        heads: int,
        layers: int,
        slots: int,
        tau: float = 0.25,
        fused_write: bool = False,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(layers)])
        self.ln_write = nn.LayerNorm(dim)
        self.writer = MemoryWriter(slots, dim, heads, tau)
        self.ln_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self._validated = False
        self.fused_write = fused_write


    def init_memory(self, batch: int) -> torch.Tensor:
        """M_0 = normalize(v_bias) (B, K, D), differentiable with respect to v_bias."""
        return self.writer.init_memory(batch)

    def encode(
        self, tokens: torch.Tensor, memory: torch.Tensor, recompute: bool = False
    ) -> torch.Tensor:
        """tokens: (B, L) ids, memory: (B, K, D) -> last layer's output (B, L, D).

        ``recompute``: keep only each layer's input for backward and recompute the layer
        in it (``torch.utils.checkpoint``), so one layer's graph is alive at a time.
        """
        validate = not self._validated
        x = self.emb(tokens)
        for layer in self.layers:
            if recompute and not validate and torch.is_grad_enabled():
                x = _recomputed(layer, x, memory, False)
            else:
                x = layer(x, memory, validate)
        self._validated = True
        return x

    def write(self, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """M' = BMN(slot_attention(M, LN x)): (B, K, D) from memory (B, K, D), x (B, L, D)."""
        h = self.ln_write(x)
        w = self.writer
        c = w.config
        op = fused_memory_write if self.fused_write else memory_write
        return op(memory, h, w.wq, w.wk, w.wv, w.v_bias, num_heads=c.heads, tau=c.tau)

    def advance(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The memory update alone (no head, no loss): what MRBP's no-grad forward needs."""
        return self.write(memory, self.encode(tokens, memory))

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln_out(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def _head_loss_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln_out(x)).float()
        return F.cross_entropy(logits, targets, reduction="sum")

    def _head_loss_chunked(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over ``HEAD_CHUNKS`` recomputed token chunks: the
        (tokens, vocab) logits, their softmax and gradient exist for one chunk at a time."""
        n = targets.numel()
        size = -(-n // self.HEAD_CHUNKS)
        chunks = zip(x.reshape(n, -1).split(size), targets.reshape(n).split(size))
        return sum(_recomputed(self._head_loss_sum, xc, tc) for xc, tc in chunks) / n

    def segment_loss(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        memory: torch.Tensor,
        recompute: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean next-token cross-entropy of the segment, M') for tokens, targets (B, L).

        ``recompute``: per-block recomputation inside the segment (each layer, the head
        with the loss in token chunks, and the write), for MRBP's replayed step: its
        backward then holds one block's graph at a time instead of the whole segment's.
        """
        x = self.encode(tokens, memory, recompute)
        if recompute and torch.is_grad_enabled():
            return self._head_loss_chunked(x, targets), _recomputed(self.write, memory, x)
        return self._head_loss(x, targets), self.write(memory, x)


def _recomputed(fn, *args):
    # No dropout or other randomness in the model, so no RNG state to save (which would
    # also be illegal inside a CUDA graph capture).
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
