"""MRBP's two per-segment programs as CUDA graphs: the no-grad advance, the recompute + backward.

Every segment of a rollout has the same shapes, so two graphs, captured once, serve any T:
the advance (memory path only, no grad) and the replayed segment with its backward. The
backward graph runs ``torch.autograd.backward``, which adds each parameter's gradient in
place into its ``.grad`` (captured by address; nothing the size of all the gradients is
held at once). So every ``.grad`` the backward reaches is allocated (zeros) before capture
and must afterwards be zeroed in place or set to None (then the captured tensor is zeroed
and put back); a ``.grad`` replaced by another tensor is an error.

CUDA only; the values and gradients are those of the eager rollout (the same step, traced
once). Shapes: any memory pytree and segment pytree that stay the same from segment to
segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from memcore.backends.torch._mrbp_eager import stored_entries
from memcore.backends.torch._mrbp_tree import (
    Segments,
    check_next_memory,
    differentiable,
    flatten_memory,
    leaves_reached,
    unpack_step,
)
from memcore.backends.torch.stash import MemoryStash
from memcore.errors import MemcoreError

__all__ = [
    "GRAPH_DEVICE",
    "GradSlots",
    "GraphedSegment",
    "capture_graph",
    "capture_stream",
    "signature",
]

_CAPTURE_STREAMS: dict[torch.device, Any] = {}

GRAPH_DEVICE = "cuda"
"""The device type graphed rollouts run on (the CPU tests swap in stand-in graphs)."""


def capture_stream(device: torch.device) -> Any:
    """The one side stream per device that every capture and warm-up of this process uses.

    cuBLAS keeps a workspace per stream for the life of the process; a fresh stream per
    capture would leave one behind in every later measurement.
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[device]


def capture_graph(
    fn: Callable[[], Any], device: torch.device, pool: Any, warmup: int = 2
) -> tuple[Any, Any]:
    """(graph, output of fn) after ``warmup`` eager runs on the capture stream, then capture."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # cuBLAS handles, autotuning, lazy allocations
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out


def _capture(fn: Callable[[], Any], device: torch.device, pool: Any) -> tuple[Any, Any]:
    return capture_graph(fn, device, pool)  # looked up at call time: tests stand in for it


def _meta(leaves: list[Any], where: str) -> tuple[Any, ...]:
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            out.append(("tensor", tuple(x.shape), x.dtype, x.device))
            continue
        try:
            hash(x)
        except TypeError:
            raise MemcoreError(
                f"graph=True needs {where} leaves that are tensors or hashable constants. "
                f"Received: leaf {i} of type {type(x).__name__}"
            ) from None
        out.append(("const", x))
    return tuple(out)


def signature(memory0: Any, segments: Segments) -> tuple[Any, ...]:
    """The static-shape key of a graphed rollout, or MemcoreError naming what is not static.

    Every segment must have segment 0's structure, tensor shapes, dtypes and devices (and
    equal non-tensor leaves); every tensor must be on one CUDA device.
    """
    m_leaves, m_spec = flatten_memory(memory0, "memory0")
    s_leaves, s_spec = pytree.tree_flatten(segments[0])
    first = (s_spec, _meta(s_leaves, "segment"))
    for t in range(1, len(segments)):
        leaves, spec = pytree.tree_flatten(segments[t])
        if (spec, _meta(leaves, "segment")) != first:
            raise MemcoreError(
                "graph=True needs segments of one structure, shape and dtype (CUDA graphs replay "
                f"fixed shapes). Received: segment {t} differs from segment 0: "
                f"{_describe(leaves)} vs {_describe(s_leaves)}"
            )
    tensors = [x for x in [*m_leaves, *s_leaves] if isinstance(x, torch.Tensor)]
    devices = {x.device for x in tensors}
    if len(devices) != 1 or next(iter(devices)).type != GRAPH_DEVICE:
        raise MemcoreError(
            "graph=True needs every memory and segment tensor on one CUDA device. "
            f"Received: devices {sorted(map(str, devices))}"
        )
    return (m_spec, _meta(m_leaves, "memory"), *first)


def _describe(leaves: list[Any]) -> str:
    return str([
        f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if isinstance(x, torch.Tensor) else repr(x)
        for x in leaves
    ])  # fmt: skip


class GradSlots:
    """The ``.grad`` tensors a captured backward adds into, and the check before each replay.

    Args:
        leaves: the tensors whose ``.grad`` the backward accumulates (zeros allocated where
            ``.grad`` is None).
    """

    def __init__(self, leaves: list[torch.Tensor]) -> None:
        self.leaves = leaves
        for p in leaves:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in leaves]

    def check(self) -> None:
        """Put back (zeroed) a ``.grad`` set to None; MemcoreError if one was replaced."""
        for p, g in zip(self.leaves, self.grads):
            if p.grad is g:
                continue
            if p.grad is None:
                p.grad = g.zero_()
                continue
            raise MemcoreError(
                "a `.grad` the captured MRBP graphs add into was replaced by another tensor "
                f"(shape {tuple(p.shape)}): zero gradients in place or set them to None "
                "(optimizer.zero_grad() does), never assign a new tensor"
            )

    @contextlib.contextmanager
    def preserved(self):
        """Warm-up runs add into ``.grad``: restore the values afterwards."""
        saved = [g.clone() for g in self.grads]
        try:
            yield
        finally:
            with torch.no_grad():
                for g, s in zip(self.grads, saved):
                    g.copy_(s)


def _amp_context(device: torch.device) -> Any:
    # The caller's autocast, replayed: its weight cache must be off inside a capture.
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext()


class GraphedSegment:
    """The advance and the replayed backward of one segment shape, captured as CUDA graphs.

    Args:
        step, advance: the user's functions; opts: the rollout options (the replay and
            recording contexts of the marked blocks); memory0, segment0: example values,
            which also fix the static shapes; pool: a CUDA graph memory pool handle.
    """

    def __init__(self, step, advance, opts, memory0, segment0, pool) -> None:
        m_leaves, self.m_spec = flatten_memory(memory0, "memory0")
        s_leaves, self.s_spec = pytree.tree_flatten(segment0)
        self.device = m_leaves[0].device
        self.step, self.advance, self.opts = step, advance, opts
        self.amp = lambda: _amp_context(self.device)
        with torch.no_grad():
            self.memory = [
                x.detach().clone().requires_grad_(differentiable(x)) for x in m_leaves
            ]
            self.segment = [x.clone() if isinstance(x, torch.Tensor) else x for x in s_leaves]
        for x in self.memory:
            if x.requires_grad:
                x.grad = torch.zeros_like(x)
        self.d_memory = [torch.zeros_like(x) if x.requires_grad else None for x in self.memory]
        mine = {id(x) for x in self.memory}
        # Static buffers for the marked blocks' outputs (keep_blocks), shaped by one recording.
        self.meta: list[tuple[Any, Any, int]] = []
        self.blocks: list[torch.Tensor] = []
        if opts.keep_blocks:
            memory = self._tree(self.memory, self.m_spec)
            segment = self._tree(self.segment, self.s_spec)
            with torch.no_grad(), self.amp(), opts.recording() as phase:
                self.advance(memory, segment)
            self.meta = [(k, spec, len(leaves)) for k, spec, leaves in phase.record]
            self.blocks = [x.clone() for _, _, leaves in phase.record for x in leaves]
        # The parameters are found on the plain replay (checkpointed blocks keep their graph).
        with torch.enable_grad(), self.amp(), opts.replaying():
            loss, nxt = unpack_step(self._step(), 0)
        outs, _ = check_next_memory(nxt, 0, "step")
        self._check_outputs(outs, "step")
        self.slots = GradSlots(leaves_reached([loss, *outs], lambda x: id(x) in mine))
        self.scale = torch.ones((), dtype=loss.dtype, device=self.device)
        self.loss_acc = torch.zeros((), dtype=torch.promote_types(loss.dtype, torch.float32),
                                    device=self.device)  # fmt: skip
        del loss, nxt, outs
        with self.slots.preserved():
            self.g_adv, self.adv_out = _capture(self._advance, self.device, pool)
            self.g_bwd, _ = _capture(self._backward, self.device, pool)

    def _tree(self, leaves: list[Any], spec: Any) -> Any:
        return pytree.tree_unflatten(leaves, spec)

    def _step(self) -> Any:
        memory = self._tree(self.memory, self.m_spec)
        return self.step(memory, self._tree(self.segment, self.s_spec))

    def _check_outputs(self, outs: list[torch.Tensor], name: str) -> None:
        if len(outs) != len(self.memory):
            raise MemcoreError(
                f"graph=True needs `{name}` to return a memory of memory0's structure. "
                f"Received: {len(outs)} leaves for memory0's {len(self.memory)}"
            )
        for i, (o, m) in enumerate(zip(outs, self.memory)):
            # A narrower dtype (bf16 under autocast into a float32 memory) copies exactly.
            exact = torch.promote_types(o.dtype, m.dtype) == m.dtype
            if o.shape != m.shape or o.device != m.device or not exact:
                raise MemcoreError(
                    f"graph=True needs `{name}` to return a memory of memory0's shapes, device "
                    "and (or narrower) dtypes, the same every segment. Received: leaf "
                    f"{i} {tuple(o.shape)} {o.dtype} for memory0's {tuple(m.shape)} {m.dtype}"
                )

    def _advance(self) -> list[torch.Tensor]:
        with torch.no_grad(), self.amp(), self.opts.recording() as phase:
            out = self.advance(
                self._tree(self.memory, self.m_spec), self._tree(self.segment, self.s_spec)
            )
        leaves, _ = check_next_memory(out, 0, "advance")
        self._check_outputs(leaves, "advance")
        if phase is None:
            return leaves
        blocks = [x for _, _, xs in phase.record for x in xs]
        meta = [(k, spec, len(xs)) for k, spec, xs in phase.record]
        if meta != self.meta or [b.shape for b in blocks] != [b.shape for b in self.blocks]:
            raise MemcoreError(
                "keep_blocks with graph=True needs `advance` to record the same marked blocks "
                f"every segment. Received: {len(meta)} blocks for {len(self.meta)}"
            )
        return leaves + blocks

    def _backward(self) -> None:
        for x in self.memory:
            if x.grad is not None:
                x.grad.zero_()
        stored = stored_entries(self.meta, self.blocks) if self.opts.keep_blocks else None
        with torch.enable_grad(), self.amp(), self.opts.replaying(stored):
            loss, nxt = unpack_step(self._step(), 0)
        outs, _ = check_next_memory(nxt, 0, "step")
        pairs = [(o, d.to(o.dtype)) for o, d in zip(outs, self.d_memory)
                 if d is not None and o.requires_grad]  # fmt: skip
        if loss.requires_grad:
            pairs.insert(0, (loss, self.scale))
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
        self.loss_acc.add_(loss.detach())

    def _load(self, dst: list[Any], src: Any) -> None:
        leaves = pytree.tree_leaves(src)
        with torch.no_grad():
            for d, s in zip(dst, leaves):
                if isinstance(d, torch.Tensor):
                    d.copy_(s)

    def run(self, memory0: Any, segments: Segments, opts: Any):
        """One rollout: returns (loss_scale * sum_t loss_t (0-d), M_T leaves, dM_0 leaves)."""
        self.slots.check()
        self.loss_acc.zero_()
        self.scale.fill_(opts.loss_scale)
        T, n = len(segments), len(self.memory)
        store = MemoryStash(opts.stash)
        self._load(self.memory, memory0)
        with torch.no_grad():
            for t in range(T):
                self._load(self.segment, segments[t])
                self.g_adv.replay()
                # The graph's output buffers are overwritten next replay: copies. The
                # blocks of segment t go in after M_t (pushed one replay earlier).
                if opts.keep_blocks:
                    store.push_tree([o.clone() for o in self.adv_out[n:]])
                if t < T - 1:
                    store.push_tree([o.clone() for o in self.adv_out[:n]])
                    self._load(self.memory, self.adv_out[:n])
        for d in self.d_memory:
            if d is not None:
                d.zero_()
        for t in reversed(range(T)):
            self._load(self.segment, segments[t])
            if opts.keep_blocks:
                self._load(self.blocks, store.pop_tree())
            self._load(self.memory, memory0 if t == 0 else store.pop_tree())
            self.g_bwd.replay()
            if t > 0:
                for d, x in zip(self.d_memory, self.memory):
                    if d is not None:
                        d.zero_() if opts.cut(t) else d.copy_(x.grad)
        # M_T waited in the advance graph's output buffer, which the backward graph (captured
        # while that buffer was alive) never writes: copied only now, it costs no peak memory.
        with torch.no_grad():
            final = [o.clone() for o in self.adv_out[:n]]
        d0 = [x.grad if x.requires_grad else None for x in self.memory]
        return self.loss_acc * opts.loss_scale, final, d0
