"""Pytree plumbing of the model-agnostic MRBP: memories, segments, checks of what a step returns.

A *memory* is a tensor or a pytree of tensors (``torch.utils._pytree``: dicts, tuples,
lists, namedtuples). *Segments* come either as a sequence of T per-segment inputs (a list or
a tuple; segment t is ``segments[t]``, passed as-is) or stacked along a leading T axis (a
tensor, a mapping or a namedtuple of tensors; segment t indexes every tensor leaf at t and
passes the other leaves unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from memcore.errors import MemcoreError

__all__ = [
    "Segments",
    "check_loss",
    "check_next_memory",
    "differentiable",
    "flatten_memory",
    "leaves_reached",
    "unpack_step",
]


def differentiable(x: torch.Tensor) -> bool:
    """True for floating and complex tensors: the leaves a memory cotangent exists for."""
    return x.is_floating_point() or x.is_complex()


def flatten_memory(memory: Any, name: str) -> tuple[list[torch.Tensor], Any]:
    """(leaves, treespec) of a memory; MemcoreError naming ``name`` unless leaves are tensors."""
    leaves, spec = pytree.tree_flatten(memory)
    if not leaves:
        raise MemcoreError(
            f"`{name}` must be a tensor or a pytree of tensors. Received: a pytree with no leaves"
        )
    bad = [f"{type(x).__name__} at leaf {i}" for i, x in enumerate(leaves)]
    bad = [b for b, x in zip(bad, leaves) if not isinstance(x, torch.Tensor)]
    if bad:
        raise MemcoreError(
            f"`{name}` must be a tensor or a pytree of tensors. Received: {', '.join(bad)}"
        )
    return leaves, spec


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


class Segments:
    """T segments from a sequence of per-segment inputs or from leaves stacked along axis 0.

    Args:
        segments: a list or tuple (segment t = ``segments[t]``), or a tensor, mapping or
            namedtuple whose tensor leaves all have a leading axis of the same size T.
    """

    def __init__(self, segments: Any) -> None:
        self._leaves: list[Any] | None = None
        if isinstance(segments, torch.Tensor | Mapping) or _is_namedtuple(segments):
            leaves, self._spec = pytree.tree_flatten(segments)
            sizes = {tuple(x.shape[:1]) for x in leaves if isinstance(x, torch.Tensor)}
            if len(sizes) != 1 or sizes == {()}:
                shapes = [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor)]
                raise MemcoreError(
                    "`segments` stacked as a tensor, mapping or namedtuple must have tensor "
                    "leaves with one leading size T >= 1 (the segment axis). Received: "
                    f"tensor leaf shapes {shapes}"
                )
            self.T = sizes.pop()[0]
            self._leaves = leaves
        elif isinstance(segments, list | tuple):
            self.T = len(segments)
            self._seq = segments
        else:
            raise MemcoreError(
                "`segments` must be a list or tuple of T segments, or a tensor, mapping or "
                f"namedtuple stacked along a leading T axis. Received: {type(segments).__name__}"
            )
        if self.T < 1:
            raise MemcoreError(f"`segments` must hold T >= 1 segments. Received: T={self.T}")

    def __len__(self) -> int:
        return self.T

    def __getitem__(self, t: int) -> Any:
        if self._leaves is None:
            return self._seq[t]
        return pytree.tree_unflatten(
            [x[t] if isinstance(x, torch.Tensor) else x for x in self._leaves], self._spec
        )


def check_loss(loss: Any, t: int) -> torch.Tensor:
    """The loss a step returned, or MemcoreError unless it is a 0-d tensor."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        tensor = isinstance(loss, torch.Tensor)
        got = f"shape {tuple(loss.shape)}" if tensor else type(loss).__name__
        raise MemcoreError(
            "`step` must return (loss, next_memory) with loss a 0-d tensor. "
            f"Received at segment {t}: loss of {got}"
        )
    return loss


def unpack_step(out: Any, t: int) -> tuple[torch.Tensor, Any]:
    """(loss, next_memory) from what ``step`` returned, checked."""
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise MemcoreError(
            "`step` must return a pair (loss, next_memory). "
            f"Received at segment {t}: {type(out).__name__}"
        )
    return check_loss(out[0], t), out[1]


def check_next_memory(memory: Any, t: int, name: str) -> tuple[list[torch.Tensor], Any]:
    """(leaves, spec) of the memory ``name`` returned at segment t; leaves must be tensors."""
    try:
        return flatten_memory(memory, "next_memory")
    except MemcoreError as exc:
        raise MemcoreError(f"`{name}` returned a bad next memory at segment {t}: {exc}") from None


def leaves_reached(roots: list[torch.Tensor], skip: Callable[[torch.Tensor], bool]) -> list:
    """The leaf tensors that ``backward`` from ``roots`` would accumulate ``.grad`` into.

    Walks the autograd graph (AccumulateGrad nodes hold their ``variable``); leaves for which
    ``skip`` is true are left out. Order: first reached first, each leaf once.
    """
    out: list[torch.Tensor] = []
    seen_leaf: set[int] = set()
    seen_node: set[int] = set()

    def add(x: torch.Tensor) -> None:
        if id(x) not in seen_leaf and not skip(x):
            seen_leaf.add(id(x))
            out.append(x)

    stack = []
    for r in roots:
        if r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad:
            add(r)
    while stack:
        node = stack.pop()
        if id(node) in seen_node:
            continue
        seen_node.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            add(variable)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return out
