"""Marked blocks of a user step: per-block recompute in MRBP's replay, and block outputs kept.

:func:`recompute` marks a block ``fn(*args)`` of the step. What it does depends on the phase
of the rollout (a context variable, so nothing global changes):

- anywhere else (plain autograd, BPTT, evaluation): the plain call;
- the replayed segment (grad on): ``torch.utils.checkpoint`` (non-reentrant, no RNG
  preservation, which a CUDA graph capture forbids): the block's inputs are saved, its
  forward runs again in the backward, so one block's graph is alive at a time;
- with ``keep_blocks``: the no-grad forward records each marked block's outputs (they wait
  in the stash with the memories); in the replay, the k-th marked call returns the k-th
  recorded output (same block, same output shapes) without running the block, through
  :class:`_Stored`, whose backward recomputes the block from its inputs and
  back-propagates it. The replay's forward then runs only the unmarked code (and marked
  blocks that were not recorded), which removes one forward of the marked blocks per
  segment. The advance must make the same marked calls on the same inputs as the step,
  in the same order, first.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

__all__ = ["Phase", "recompute", "recording", "replaying"]


class Phase:
    """The rollout phase the markers see: recording (no-grad forward) or replaying.

    Attributes:
        record: recorded entries (key, output treespec, output leaves) while recording.
        stored: the entries the replay may use (outputs loaded from the stash), or None.
    """

    def __init__(self, replay: bool, stored: list[Any] | None = None) -> None:
        self.replay = replay
        self.record: list[tuple[Any, Any, list[torch.Tensor]]] = []
        self.stored = stored
        self.index = 0


_PHASE: contextvars.ContextVar[Phase | None] = contextvars.ContextVar("mrbp_phase", default=None)


def _key(fn: Any) -> Any:
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):  # bound methods are made anew
        return (id(fn.__self__), fn.__func__)
    return id(fn)


def _autocast_state() -> list[tuple[str, torch.dtype, bool]]:
    return [
        (d, torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled())
        for d in ("cuda", "cpu")
        if torch.is_autocast_enabled(d)
    ]


class _Stored(torch.autograd.Function):
    """Returns a recorded block output; its backward recomputes the block and back-propagates."""

    @staticmethod
    def forward(ctx, fn, kwargs, n_args, outputs, *args):  # type: ignore[override]
        ctx.fn, ctx.kwargs, ctx.amp, ctx.n_args = fn, kwargs, _autocast_state(), n_args
        ctx.positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.others = [a if not isinstance(a, torch.Tensor) else None for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.positions])
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        args = list(ctx.others)
        for i, saved in zip(ctx.positions, ctx.saved_tensors):
            args[i] = saved.detach().requires_grad_(saved.requires_grad)
        call = args[: ctx.n_args]  # without the grad-carrying dummy, if one was added
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, dtype, cache in ctx.amp:
                stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))
            outs = pytree.tree_leaves(ctx.fn(*call, **ctx.kwargs))
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        tensor_grads = [
            a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args
        ]
        return (None, None, None, None, *tensor_grads)


def recompute(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; inside MRBP's replayed segment, recomputed in its backward.

    Mark a block of your step with ``x = recompute(layer, x, memory)``. Everywhere else
    (the no-grad forward, plain autograd, BPTT) it is the plain call. In the replayed
    segment (with grad) it runs through ``torch.utils.checkpoint`` (non-reentrant, without
    RNG preservation, which would be illegal inside a CUDA graph): only the block's inputs
    are saved, and its forward runs again during the backward, so one block's graph is
    alive at a time. With ``keep_blocks=True`` the replay uses the block's output recorded
    in the no-grad forward instead of running it (see :mod:`._mrbp_blocks`). Gradients are
    unchanged.
    """
    phase = _PHASE.get()
    if phase is None:
        return fn(*args, **kwargs)
    if not phase.replay:
        out = fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        if all(isinstance(x, torch.Tensor) for x in leaves):
            phase.record.append((_key(fn), spec, leaves))
        return out
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    stored = phase.stored
    if stored is not None and phase.index < len(stored) and stored[phase.index][0] == _key(fn):
        _, spec, outputs = stored[phase.index]
        phase.index += 1
        n_args = len(args)
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # The block's parameters are not inputs of the Function: an input that needs
            # grad keeps its outputs in the graph, so its backward runs.
            args = (*args, outputs[0].new_zeros(0).requires_grad_(True))
        out = _Stored.apply(fn, kwargs, n_args, outputs, *args)
        return pytree.tree_unflatten(list(out), spec)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


@contextlib.contextmanager
def recording(enabled: bool, modules: tuple[nn.Module, ...]) -> Iterator[Phase | None]:
    """The no-grad forward of one segment; yields the Phase whose ``record`` fills up."""
    if not enabled:
        yield None
        return
    with _phase(Phase(replay=False), modules) as phase:
        yield phase


def replaying(modules: tuple[nn.Module, ...], stored: list[Any] | None = None) -> Any:
    """The replayed segment: markers recompute; ``modules`` run through :func:`recompute`."""
    return _phase(Phase(replay=True, stored=stored), modules)


@contextlib.contextmanager
def _phase(phase: Phase, modules: tuple[nn.Module, ...]) -> Iterator[Phase]:
    token = _PHASE.set(phase)
    patched = []
    try:
        for m in modules:
            had = "forward" in m.__dict__
            original = m.forward
            m.forward = functools.partial(recompute, original)
            patched.append((m, had, original))
        yield phase
    finally:
        for m, had, original in reversed(patched):
            if had:
                m.forward = original
            else:
                del m.forward
        _PHASE.reset(token)
