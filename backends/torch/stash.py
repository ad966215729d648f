"""Where MRBP keeps its stored memories: on the device, or offloaded to pinned host memory.

MRBP (Memformer Alg. 1) keeps M_0..M_{T-1} from its no-grad forward and uses them once
each, newest first, in the replayed backward. That access pattern is a stack, so the
memories can live anywhere a stack can: :class:`MemoryStash` with ``where="host"`` copies
each pushed memory to pinned host memory on a side CUDA stream, and while the caller
replays segment t it already fetches M_{t-1} back. The device then holds at most three
memories (the one in use, the prefetched one, one in flight to the host) whatever T is,
and the GPU's share of MRBP's memory stops growing with T (docs/performance.md, section 1).
The copies overlap the caller's compute; what they cost is reported by ``bench.mrbp_lm``.

Values are bit-identical to keeping the memories on the device (a copy is a copy), so
every equivalence MRBP has with BPTT holds unchanged.

Shapes: any; in MRBP a memory is (B, K, D). A memory that is a pytree of tensors (several
memories, per-layer memories) goes in with :meth:`MemoryStash.push_tree` and comes back with
:meth:`MemoryStash.pop_tree`: its leaves are pushed one by one, so the prefetch of the next
older memory's last leaf starts as soon as the newer memory's first leaf is popped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from memcore.errors import MemcoreError

__all__ = ["WHERE", "MemoryStash", "check_where"]

WHERE = ("device", "host")
"""The places a :class:`MemoryStash` can keep memories."""


def check_where(where: str, name: str = "where") -> None:
    """MemcoreError naming argument ``name`` unless ``where`` is one of :data:`WHERE`."""
    if where not in WHERE:
        raise MemcoreError(
            f"`{name}` must be one of {', '.join(map(repr, WHERE))}. Received: {name}={where!r}"
        )


class _Entry(NamedTuple):
    host: torch.Tensor  # pinned host copy
    written: Any  # torch.cuda.Event: the device-to-host copy has finished
    device: torch.device


class _Fetched(NamedTuple):
    tensor: torch.Tensor  # device copy, allocated on the side stream
    ready: Any  # torch.cuda.Event: the host-to-device copy has finished


class MemoryStash:
    """A stack of tensors (MRBP's memories) kept on their device or offloaded to the host.

    ``push`` in forward order, ``pop`` in reverse. A pushed tensor must not be modified
    afterwards (push a clone of a buffer you reuse): with ``where="host"`` the copy to the
    host runs asynchronously on a side stream. A pop returns a tensor on the pushed one's
    device, safe to use on the current stream: with ``"device"`` the pushed tensor itself
    (detached), with ``"host"`` a new copy. On a CPU tensor ``"host"`` keeps the tensor
    itself: it is in host memory already.

    Args:
        where: ``"device"`` (keep the tensors) or ``"host"`` (pinned host copies).
        prefetch: with ``"host"``, start fetching the next tensor to be popped as soon as
            one is popped, so the copy overlaps the caller's work.
    """

    def __init__(self, where: str = "device", *, prefetch: bool = True) -> None:
        check_where(where)
        self.where = where
        self.prefetch = prefetch
        self._items: list[Any] = []
        self._fetched: dict[int, _Fetched] = {}  # index in _items -> device copy
        self._streams: dict[torch.device, Any] = {}
        self._trees: list[tuple[Any, int]] = []  # (treespec, leaves) per push_tree

    def __len__(self) -> int:
        return len(self._items)

    @property
    def host_bytes(self) -> int:
        """Bytes of the pinned host copies held now."""
        return sum(e.host.nbytes for e in self._items if isinstance(e, _Entry))

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def push(self, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (detached; it must not be modified afterwards)."""
        if not isinstance(tensor, torch.Tensor):
            raise MemcoreError(
                f"`tensor` must be a torch.Tensor. Received: tensor of type {type(tensor).__name__}"
            )
        tensor = tensor.detach()
        if self.where == "device" or tensor.device.type != "cuda":
            self._items.append(tensor)
            return
        side = self._stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(side):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            written = torch.cuda.Event()
            written.record(side)
        # The caller may free `tensor` now: its block must not be reused before the copy
        # on the side stream has read it.
        tensor.record_stream(side)
        self._items.append(_Entry(host, written, tensor.device))

    def _fetch(self, index: int) -> None:
        entry = self._items[index]
        if not isinstance(entry, _Entry) or index in self._fetched:
            return
        side = self._stream(entry.device)
        side.wait_event(entry.written)
        with torch.cuda.stream(side):
            out = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            out.copy_(entry.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        self._fetched[index] = _Fetched(out, ready)

    def pop(self) -> torch.Tensor:
        """Remove and return the newest tensor, on its original device."""
        if not self._items:
            raise MemcoreError("pop from an empty MemoryStash: every pop needs an earlier push")
        index = len(self._items) - 1
        entry = self._items[index]
        if not isinstance(entry, _Entry):
            self._items.pop()
            return entry
        self._fetch(index)
        out, ready = self._fetched.pop(index)
        self._items.pop()
        current = torch.cuda.current_stream(entry.device)
        current.wait_event(ready)
        out.record_stream(current)  # allocated on the side stream, used on this one
        if self.prefetch and self._items:
            self._fetch(index - 1)
        return out

    def push_tree(self, tree: Any) -> None:
        """Store a pytree of tensors (``torch.utils._pytree``), leaf by leaf, as :meth:`push`."""
        leaves, spec = pytree.tree_flatten(tree)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
        if bad:
            raise MemcoreError(
                "`tree` must be a pytree whose leaves are all torch.Tensors. "
                f"Received: leaves of type {', '.join(sorted(set(bad)))}"
            )
        for leaf in leaves:
            self.push(leaf)
        self._trees.append((spec, len(leaves)))

    def pop_tree(self) -> Any:
        """Remove and return the newest pytree pushed with :meth:`push_tree` (as :meth:`pop`)."""
        if not self._trees:
            raise MemcoreError("pop_tree needs an earlier push_tree: none is left in the stash")
        spec, n = self._trees.pop()
        leaves = [self.pop() for _ in range(n)]
        return pytree.tree_unflatten(leaves[::-1], spec)

    def clear(self) -> None:
        """Drop everything (pending copies finish first, on their stream)."""
        self._items.clear()
        self._fetched.clear()
        self._trees.clear()
