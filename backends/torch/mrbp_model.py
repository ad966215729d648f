"""Memory Replay Back-Propagation over any user step (torch): MRBP for your own memory model.

    from memcore.backends.torch.mrbp_model import mrbp, recompute

    def step(memory, segment):             # any function or nn.Module
        loss, next_memory = model(memory, segment)
        return loss, next_memory

    out = mrbp(step, model.init_memory(B), segments)   # .grad filled like loss.backward()
    optimizer.step(); optimizer.zero_grad()
    memory = out.memory                                  # detached M_T for the next rollout

A no-grad forward runs the memory path alone (``advance``, default: the step without its
loss) and keeps M_1..M_{T-1} (on the device or in pinned host memory); then segments
T-1..0 are recomputed one at a time from their stored memory and back-propagated with
(loss_scale, dM_{t+1}), so at most one segment's graph exists at a time. The gradient is
the one ``loss.backward()`` gives through the same steps (docs/semantics.md, "MRBP over a
user step", defines it with truncation and the sliding horizon). The step must be
deterministic: it runs twice per segment (the forward, the replay), and dropout would draw
different masks.

Shapes: ``memory`` any tensor or pytree of tensors (e.g. (B, K, D) per memory); segments
as the step takes them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memcore.backends.torch._mrbp_blocks import recompute
from memcore.backends.torch._mrbp_eager import Options, forward_memories, replay
from memcore.backends.torch._mrbp_graphs import GraphedSegment, signature
from memcore.backends.torch._mrbp_tree import Segments, flatten_memory
from memcore.backends.torch.stash import MemoryStash, check_where
from memcore.errors import MemcoreError

__all__ = ["MRBP", "MRBPOutput", "mrbp", "recompute"]


class MRBPOutput(NamedTuple):
    """loss: L = loss_scale * sum_t loss_t, 0-d and detached (no host sync); memory: M_T,
    detached, in the memory's pytree structure, for the next rollout."""

    loss: torch.Tensor
    memory: Any


_FSDP_CLASSES = ("FullyShardedDataParallel", "FSDPModule")


def _ddp_type() -> Any:
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _check_int(name: str, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
    ):
        raise MemcoreError(f"`{name}` must be None or an integer >= 1. Received: {name}={value!r}")


class MRBP:
    """A reusable MRBP rollout: ``MRBP(step, ...)(memory0, segments)`` is ``mrbp(step, memory0,
    segments, ...)``; with ``graph=True`` it keeps the CUDA graphs it captured, per shapes.

    Args: see :func:`mrbp`.
    """

    def __init__(
        self,
        step: Callable[[Any, Any], tuple[torch.Tensor, Any]],
        *,
        advance: Callable[[Any, Any], Any] | None = None,
        stash: str = "device",
        graph: bool = False,
        truncate_every: int | None = None,
        horizon: int | None = None,
        loss_scale: float = 1.0,
        ddp: Any = None,
        recompute: Iterable[nn.Module] = (),
        keep_blocks: bool = False,
    ) -> None:
        if not callable(step):
            raise MemcoreError(f"`step` must be callable. Received: {type(step).__name__}")
        if advance is not None and not callable(advance):
            raise MemcoreError(
                f"`advance` must be None or callable. Received: {type(advance).__name__}"
            )
        check_where(stash, "stash")
        _check_int("truncate_every", truncate_every)
        _check_int("horizon", horizon)
        if (
            isinstance(loss_scale, bool)
            or not isinstance(loss_scale, numbers.Real)
            or not math.isfinite(loss_scale)
        ):
            raise MemcoreError(
                f"`loss_scale` must be a finite real number. Received: loss_scale={loss_scale!r}"
            )
        sharded = [
            type(m).__name__
            for m in (step, ddp)
            if any(c.__name__ in _FSDP_CLASSES for c in type(m).__mro__)
        ]
        if sharded:
            # Each replayed segment's backward would reduce-scatter (T times per rollout) and
            # the stash would hold unsharded memories: not tested, so refused, not guessed.
            raise MemcoreError(
                "`step` must not be FSDP-wrapped: mrbp supports DistributedDataParallel "
                f"(ddp=) or a single process. Received: {sharded[0]}"
            )
        ddp_type = _ddp_type()
        if ddp is None and ddp_type is not None and isinstance(step, ddp_type):
            ddp = step
        if ddp is not None and (ddp_type is None or not isinstance(ddp, ddp_type)):
            raise MemcoreError(
                "`ddp` must be None or a torch.nn.parallel.DistributedDataParallel. "
                f"Received: {type(ddp).__name__}"
            )
        modules = tuple({id(m): m for m in recompute}.values())
        bad = [type(m).__name__ for m in modules if not isinstance(m, nn.Module)]
        if bad:
            raise MemcoreError(f"`recompute` must hold nn.Modules. Received: {', '.join(bad)}")
        if graph and horizon is not None:
            raise MemcoreError(
                "`horizon` is not supported with graph=True (its per-loss memory cotangents "
                "change in number along the rollout). Received: horizon="
                f"{horizon}, graph=True; use graph=False or truncate_every"
            )
        if keep_blocks and (horizon is not None or ddp is not None):
            raise MemcoreError(
                "`keep_blocks` is not supported with a horizon or DDP (a kept block's backward "
                "accumulates its parameters' gradient itself, once per traversal). Received: "
                f"keep_blocks=True, horizon={horizon}, ddp={type(ddp).__name__}"
            )
        if graph and ddp is not None:
            raise MemcoreError(
                "`ddp` is not supported with graph=True (DDP's reducer cannot run inside a "
                "captured backward). Received: a DistributedDataParallel with graph=True"
            )
        self.step = step
        self.advance = advance if advance is not None else (lambda m, s: step(m, s)[1])
        self.graph = bool(graph)
        self.opts = Options(
            stash=stash,
            truncate_every=truncate_every,
            horizon=horizon,
            loss_scale=float(loss_scale),
            ddp=ddp,
            modules=modules,
            keep_blocks=bool(keep_blocks),
        )
        self._graphs: dict[Any, GraphedSegment] = {}
        self._pool: Any = None

    def _graphed(self, memory0: Any, segments: Segments) -> GraphedSegment:
        if not torch.cuda.is_available():
            raise MemcoreError(
                "graph=True needs CUDA (CUDA graphs); none is available. Received: graph=True "
                "on a machine without a CUDA device"
            )
        key = signature(memory0, segments)
        device = flatten_memory(memory0, "memory0")[0][0].device
        key = (*key, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = GraphedSegment(
                self.step, self.advance, self.opts, memory0, segments[0], self._pool
            )
        return self._graphs[key]

    def capture(self, memory0: Any, segments: Any) -> None:
        """Capture the CUDA graphs for these shapes now (graph=True); ``.grad`` is unchanged."""
        if not self.graph:
            raise MemcoreError("capture needs graph=True. Received: an MRBP with graph=False")
        self._graphed(memory0, Segments(segments))

    def __call__(self, memory0: Any, segments: Any) -> MRBPOutput:
        """One rollout over ``segments`` from ``memory0``; see :func:`mrbp`."""
        leaves, spec = flatten_memory(memory0, "memory0")
        segs = Segments(segments)
        if self.graph:
            runner = self._graphed(memory0, segs)
            loss, final, d0 = runner.run(memory0, segs, self.opts)
            pairs = [(x, d) for x, d in zip(leaves, d0) if d is not None and x.requires_grad]
            if pairs:  # dM_0 through memory0's own graph (e.g. init_memory from v_bias)
                torch.autograd.backward([x for x, _ in pairs], [d for _, d in pairs])
            return MRBPOutput(loss, pytree.tree_unflatten(final, spec))
        store = MemoryStash(self.opts.stash)
        final, blocks = forward_memories(self.advance, memory0, segs, store, self.opts)
        loss = replay(self.step, memory0, segs, store, blocks, self.opts)
        return MRBPOutput(loss, final)


def mrbp(
    step: Callable[[Any, Any], tuple[torch.Tensor, Any]],
    memory0: Any,
    segments: Any,
    *,
    advance: Callable[[Any, Any], Any] | None = None,
    stash: str = "device",
    graph: bool = False,
    truncate_every: int | None = None,
    horizon: int | None = None,
    loss_scale: float = 1.0,
    ddp: Any = None,
    recompute: Iterable[nn.Module] = (),
    keep_blocks: bool = False,
) -> MRBPOutput:
    """One MRBP rollout of ``step`` over T segments; dL/dparam accumulates into ``.grad``.

    L = loss_scale * sum_t loss_t, where ``(loss_t, M_{t+1}) = step(M_t, segment_t)`` and
    M_0 = ``memory0``. Gradients accumulate like ``L.backward()`` into every leaf the steps
    reach (parameters of a module or tensors a function closes over). When ``memory0``
    carries a graph (e.g. ``model.init_memory(B)`` from ``v_bias``), dM_0 is sent through
    it; pass detached memories to cut the gradient at the rollout boundary.

    Args:
        step: ``step(memory, segment) -> (loss_t (0-d tensor), next_memory)``, a function
            or an nn.Module (a DistributedDataParallel is detected as ``ddp``).
        memory0: M_0, a tensor or a pytree of tensors (dicts, tuples, lists, namedtuples).
        segments: a list or tuple of T segments (each passed to ``step`` as-is), or a
            tensor, mapping or namedtuple of tensors stacked along a leading T axis
            (segment t indexes every tensor leaf at t).
        advance: ``advance(memory, segment) -> next_memory``, the memory path alone for the
            no-grad forward (no head, no loss); default: ``step`` without its loss. It must
            compute the same next memory as ``step``.
        stash: where M_1..M_{T-1} wait: "device", or "host" (pinned host memory; the
            device's share stops growing with T; :class:`~.stash.MemoryStash`).
        graph: capture the advance and the replayed backward as CUDA graphs (static shapes,
            one CUDA device; ``.grad`` must then be zeroed in place or set to None, never
            replaced). Use :class:`MRBP` to keep the graphs across rollouts.
        truncate_every: k: no gradient through the memory entering segment t when
            t % k == 0, t > 0.
        horizon: h: loss_t's gradient reaches memories M_t..M_{t-h+1} only (eager only;
            costs up to h memory-path VJPs per segment).
        loss_scale: multiplies every loss (gradient accumulation: 1 / micro-batches).
        ddp: a DistributedDataParallel the step runs: segments T-1..1 replay under its
            ``no_sync()``, so gradients are all-reduced once, in segment 0's backward.
        recompute: modules whose forward runs through :func:`recompute` in the replay.
        keep_blocks: the no-grad forward records the outputs of the blocks marked with
            :func:`recompute` (or listed in ``recompute``) and stashes them with the
            memories; the replay then returns them instead of running those blocks, whose
            backward still recomputes them. One forward of the marked blocks less per
            segment, for their outputs' bytes in the stash. ``advance`` must make the same
            marked calls on the same inputs as ``step``, in the same order, first.

    Returns:
        MRBPOutput(loss, memory=M_T).
    """
    runner = MRBP(
        step,
        advance=advance,
        stash=stash,
        graph=graph,
        truncate_every=truncate_every,
        horizon=horizon,
        loss_scale=loss_scale,
        ddp=ddp,
        recompute=recompute,
        keep_blocks=keep_blocks,
    )
    return runner(memory0, segments)
