"""The eager MRBP rollout over a user step: a no-grad forward, then one replayed segment at a time.

Definitions (cuts, the sliding horizon, what reaches ``memory0``) are in docs/semantics.md,
"MRBP over a user step"; :func:`memcore.backends.torch.mrbp_model.mrbp` documents the
arguments. Shapes: whatever the user's memory and segments are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from memcore.backends.torch import _mrbp_blocks as blocks
from memcore.backends.torch._mrbp_tree import (
    Segments,
    check_next_memory,
    differentiable,
    flatten_memory,
    unpack_step,
)
from memcore.backends.torch.stash import MemoryStash
from memcore.errors import MemcoreError

__all__ = ["Options", "forward_memories", "replay", "stored_entries"]


class Options:
    """The rollout options, checked by the public entry (a plain record)."""

    def __init__(
        self,
        *,
        stash: str,
        truncate_every: int | None,
        horizon: int | None,
        loss_scale: float,
        ddp: Any,
        modules: tuple[Any, ...],
        keep_blocks: bool,
    ) -> None:
        self.stash, self.truncate_every, self.horizon = stash, truncate_every, horizon
        self.loss_scale, self.ddp = loss_scale, ddp
        self.modules, self.keep_blocks = modules, keep_blocks

    def replaying(self, stored: list[Any] | None = None) -> Any:
        """The replayed segment's context (markers recompute, or use ``stored`` outputs)."""
        return blocks.replaying(self.modules, stored)

    def recording(self) -> Any:
        """A no-grad segment's context: yields the Phase recording the marked blocks, or None."""
        return blocks.recording(self.keep_blocks, self.modules)

    def cut(self, t: int) -> bool:
        """True when gradient stops at the memory entering segment t (truncate_every)."""
        k = self.truncate_every
        return k is not None and t > 0 and t % k == 0


def accumulator(loss: torch.Tensor) -> torch.Tensor:
    """A zero of the loss's dtype promoted to at least float32, on its device."""
    return torch.zeros((), dtype=torch.promote_types(loss.dtype, torch.float32), device=loss.device)


def forward_memories(
    advance: Callable[[Any, Any], Any],
    memory0: Any,
    segments: Segments,
    store: MemoryStash,
    opts: Options,
) -> tuple[Any, list[list[tuple[Any, Any, int]]]]:
    """No-grad forward: pushes M_1..M_{T-1} (and, with keep_blocks, each segment's marked
    block outputs after its memory) into ``store``.

    Returns:
        (M_T with detached leaves, per segment the recorded blocks' (key, spec, leaves)).
    """
    memory = pytree.tree_map(lambda x: x.detach(), memory0)
    recorded: list[list[tuple[Any, Any, int]]] = []
    with torch.no_grad():
        for t in range(len(segments)):
            if t > 0:
                store.push_tree(memory)
            with opts.recording() as phase:
                memory = advance(memory, segments[t])
            check_next_memory(memory, t, "advance")
            if phase is not None:
                store.push_tree([x for _, _, leaves in phase.record for x in leaves])
                recorded.append([(k, spec, len(leaves)) for k, spec, leaves in phase.record])
    return pytree.tree_map(lambda x: x.detach(), memory), recorded


def stored_entries(meta: list[tuple[Any, Any, int]], leaves: list[torch.Tensor]) -> list:
    """The recorded (key, spec, outputs) of one segment from its popped leaves."""
    out, i = [], 0
    for key, spec, n in meta:
        out.append((key, spec, leaves[i : i + n]))
        i += n
    return out


def _sum(trees: Sequence[list[torch.Tensor | None]]) -> list[torch.Tensor | None] | None:
    """Leafwise sum of cotangent lists (None = zero); None when there are none."""
    if not trees:
        return None
    out: list[torch.Tensor | None] = list(trees[0])
    for tree in trees[1:]:
        out = [b if a is None else a if b is None else a + b for a, b in zip(out, tree)]
    return out


def _pairs(outs: list[torch.Tensor], cts: list[torch.Tensor | None] | None):
    """(outputs, cotangents) keeping pairs with a cotangent and an output that needs grad."""
    if cts is None:
        return [], []
    kept = [(o, c) for o, c in zip(outs, cts) if c is not None and o.requires_grad]
    return [o for o, _ in kept], [c for _, c in kept]


def _vjp(outs, cts, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Cotangents of ``inputs`` for (outs, cts), keeping the graph; None where unreached."""
    o, c = _pairs(outs, cts)
    wanted = [x for x in inputs if x.requires_grad]
    if not o or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(o, wanted, c, retain_graph=True, allow_unused=True))
    return [next(got) if x.requires_grad else None for x in inputs]


def replay(
    step: Callable[[Any, Any], Any],
    memory0: Any,
    segments: Segments,
    store: MemoryStash,
    recorded: list[list[tuple[Any, Any, int]]],
    opts: Options,
) -> torch.Tensor:
    """Replays segments T-1..0, back-propagating each; returns loss_scale * sum_t loss_t (0-d).

    Without a horizon, one cotangent dM_{t+1} (the sum over every later loss) enters the
    backward of segment t. With a horizon h, the cotangent of each of the last h - 1 losses
    travels separately (one VJP of the memory path per live stream and segment), so that
    each stops after h segments; the parameters still get one backward per segment with
    the streams' sum. Segment 0 runs on ``memory0`` itself, so dM_0 reaches its graph in the
    same backward (under DDP, inside the one synchronized backward).
    """
    T, h, scale = len(segments), opts.horizon, opts.loss_scale
    total: torch.Tensor | None = None
    streams: list[tuple[int, list[torch.Tensor | None]]] = []  # (origin, dM_{t+1} leaves)
    for t in reversed(range(T)):
        # Does any cotangent leave segment t through the memory entering it?
        feeds = t > 0 and not opts.cut(t) and (h is None or h >= 2)
        stored = stored_entries(recorded[t], store.pop_tree()) if recorded else None
        if t == 0:
            memory = memory0
        else:
            memory = store.pop_tree()
            for x in pytree.tree_leaves(memory):
                x.requires_grad_(feeds and differentiable(x))
        in_leaves, _ = flatten_memory(memory, "memory0")
        sync = opts.ddp.no_sync() if opts.ddp is not None and t > 0 else contextlib.nullcontext()
        with sync:
            with opts.replaying(stored):
                loss, next_memory = unpack_step(step(memory, segments[t]), t)
            out_leaves, _ = check_next_memory(next_memory, t, "step")
            live = [s for s in streams if s[0] <= t + (h or T) - 1]
            d_next = _sum([ct for _, ct in live])
            if d_next is not None and len(d_next) != len(out_leaves):
                raise MemcoreError(
                    "`step` and `advance` must return memories of one structure. Received at "
                    f"segment {t}: {len(out_leaves)} leaves from step, {len(d_next)} from advance"
                )
            loss_ct = torch.full_like(loss, scale)
            streams = []
            if feeds and h is not None:
                # Streams that still have segments to travel after this one, kept apart.
                for origin, ct in live:
                    if origin <= t + h - 2:
                        streams.append((origin, _vjp(out_leaves, ct, in_leaves)))
                streams.append((t, _vjp([loss], [loss_ct], in_leaves)))
            outs, cts = _pairs(out_leaves, d_next)
            if loss.requires_grad:
                outs, cts = [loss, *outs], [loss_ct, *cts]
            if outs:
                torch.autograd.backward(outs, cts)
        total = (accumulator(loss) if total is None else total) + loss.detach()
        if feeds and h is None:
            streams = [(t, [x.grad if differentiable(x) else None for x in in_leaves])]
    assert total is not None
    return total * scale if scale != 1.0 else total
